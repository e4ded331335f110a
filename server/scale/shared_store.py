"""The adapter store as every engine replica sees it: read-only, looked up by pool key at load time.

Writes (upload, delete) happen once, at the ingress, through the ordinary AdapterRegistry/AdapterStore over
`data_dir/adapters`. A replica never opens an AdapterStore (opening one runs crash recovery, which could
remove another process's upload in progress); it reads one committed version directory when its
multiplexed loader is asked for `tenant/name@version`. Version directories are immutable once committed,
so version N read on any replica is version N. `VersionSource` is the interface an object store would
implement (fetch a committed version to a local directory).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Protocol

from server.adapters.errors import AdapterNotFound
from server.adapters.store import DELETED_THROUGH, MANIFEST, StoredVersion

_KEY = re.compile(r"^([^/@]+)/([^/@]+)@(\d+)$")


def parse_key(key: str) -> tuple[str, str, int]:
    """`tenant/name@version` -> (tenant, name, version); AdapterNotFound for anything else."""
    m = _KEY.match(key or "")
    if m is None:
        raise AdapterNotFound(f"not an adapter pool key: {key!r} (expected tenant/name@version)")
    return m[1], m[2], int(m[3])


class VersionSource(Protocol):
    def check(self, tenant: str, name: str, version: int) -> None:
        """AdapterNotFound when the version was deleted or never committed."""
        ...

    def fetch(self, tenant: str, name: str, version: int) -> StoredVersion:
        """The committed version (its files in a local directory); AdapterNotFound when it does not exist."""
        ...


class SharedDirectory:
    """VersionSource over a directory every replica mounts (one machine's data dir, NFS, a cluster FS)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def check(self, tenant: str, name: str, version: int) -> None:
        """AdapterNotFound once the version was deleted (two stats; a replica asks before each request)."""
        name_dir = self.root / tenant / name
        marker = name_dir / DELETED_THROUGH
        if marker.is_file() and version <= int(marker.read_text().strip() or 0):
            raise AdapterNotFound(f"adapter {tenant}/{name}@{version} was deleted")
        if not (name_dir / f"v{version:06d}").is_dir():
            raise AdapterNotFound(f"adapter {tenant}/{name}@{version} is not in the store")

    def fetch(self, tenant: str, name: str, version: int) -> StoredVersion:
        self.check(tenant, name, version)
        vdir = self.root / tenant / name / f"v{version:06d}"
        try:
            manifest = json.loads((vdir / MANIFEST).read_text())
        except FileNotFoundError:
            raise AdapterNotFound(f"adapter {tenant}/{name}@{version} is not in the store") from None
        return StoredVersion(tenant=manifest["tenant"], name=manifest["name"], version=int(manifest["version"]),
                             path=vdir, created_at=float(manifest["created_at"]), shared=bool(manifest["shared"]),
                             files=dict(manifest["files"]), meta=dict(manifest.get("meta") or {}))
