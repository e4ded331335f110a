"""`python -m server.protogen`: generate the gRPC stubs (+ .pyi type stubs) from proto/ into switchboard/.

The generated package is `switchboard.v1` (`inference_pb2`, `inference_pb2_grpc`, `admin_pb2`, ...); it
is not checked in. `make install` / `make proto` run this; `ensure_stubs()` regenerates on demand when a
.proto is newer than its stubs (so a fresh checkout works from tests and the client too).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_ROOT = ROOT


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def _stub_of(proto: Path) -> Path:
    rel = proto.relative_to(PROTO_ROOT).with_suffix("")
    return OUT_ROOT / rel.parent / f"{rel.name}_pb2.py"


def stale() -> bool:
    return any(not _stub_of(p).exists() or _stub_of(p).stat().st_mtime < p.stat().st_mtime for p in proto_files())


def generate() -> list[Path]:
    """Run grpc_tools.protoc over every .proto; returns the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    protos = proto_files()
    if not protos:
        raise FileNotFoundError(f"no .proto files under {PROTO_ROOT}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={OUT_ROOT}",
        f"--pyi_out={OUT_ROOT}",
        f"--grpc_python_out={OUT_ROOT}",
        *(str(p) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed (see the messages above)")
    packages = {_stub_of(p).parent for p in protos}
    for pkg in packages:  # make switchboard/ and switchboard/v1/ regular packages
        d = pkg
        while d != OUT_ROOT:
            (d / "__init__.py").touch()
            d = d.parent
    return sorted(f for pkg in packages for f in pkg.iterdir() if f.suffix in (".py", ".pyi"))


def ensure_stubs() -> None:
    """Generate the stubs if they are missing or older than the .proto files."""
    if stale():
        generate()


def main() -> int:
    files = generate()
    print(f"generated {len(files)} files under {OUT_ROOT / 'switchboard'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
