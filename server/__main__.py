"""`python -m server {serve,generate,train} ...`: one entry point, one module per subcommand."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "serve": "server.serve_cli",  # the gRPC server
        "serve-ray": "server.scale.cli",  # the same API over engine replicas on Ray Serve (the `ray` group)
        "generate": "server.generate_cli",  # quick look without gRPC
        "train": "server.trainer.cli",  # offline adapter trainer
    }
    if not argv or argv[0] not in commands:
        print(f"usage: python -m server {{{','.join(commands)}}} [options]  (-h for help)", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(commands[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
