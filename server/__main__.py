"""`python -m server {serve,generate,train} ...`: one entry point, one module per subcommand."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "serve": "server.serve_cli",  # gRPC server (issue 3)
        "generate": "server.generate_cli",  # quick look without gRPC
        "train": "server.trainer.cli",  # offline adapter trainer
    }
    if not argv or argv[0] not in commands:
        print(f"usage: python -m server {{{','.join(commands)}}} [options]  (-h for help)", file=sys.stderr)
        return 2
    import importlib

    try:
        module = importlib.import_module(commands[argv[0]])
    except ModuleNotFoundError as exc:
        if exc.name != commands[argv[0]]:
            raise
        print(f"`{argv[0]}` is not available in this build yet ({commands[argv[0]]} is missing)", file=sys.stderr)
        return 2
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
