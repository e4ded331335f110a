"""The persistent adapter store: PEFT directories on disk by tenant, name and version.

Layout under `root`:

  .staging/<uuid>/                       a version being written (never visible; removed on reopen)
  <tenant>/<name>/v000003/               one committed version:
      adapter_config.json, adapter_model.safetensors, manifest.json (sha256 + size per file, metadata)
  <tenant>/<name>/deleted_through        versions <= this number were deleted (written atomically)

Commit protocol: files are copied into a staging directory (each fsynced, its sha256 computed while
copying), the manifest is written last, the staging directory is fsynced and then renamed to its
final `vNNNNNN` name, and the parent directory is fsynced. The rename is the single commit point, so
after a crash (SIGKILL, power loss) at any moment a version is either entirely there or not at all.
Deletion first records `deleted_through` atomically (temp file, fsync, rename, fsync dir), then
removes the directories; reopening finishes any interrupted deletion. Version numbers only grow, even
across delete + re-create, so a pool key `tenant/name@version` never names two different adapters.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from server.clip import clip

MANIFEST = "manifest.json"
DELETED_THROUGH = "deleted_through"
STAGING = ".staging"
_VERSION_DIR = re.compile(r"^v(\d{6,})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CHUNK = 1 << 20


class StoreError(RuntimeError):
    """The store cannot do what was asked (I/O failure, corrupt file); the message says why."""


def check_name(kind: str, value: str) -> None:
    """Tenant and adapter names: 1-64 of [A-Za-z0-9._-], starting with a letter or digit."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(
            f"{kind} name {clip(value)} is not allowed: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )


@dataclass(frozen=True, slots=True)
class StoredVersion:
    tenant: str
    name: str
    version: int
    path: Path  # the committed version directory
    created_at: float  # unix seconds
    shared: bool
    files: dict  # file name -> {"sha256": hex, "size": bytes}
    meta: dict  # what the caller recorded (kind, rank, targets, ...)

    @property
    def size_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.files.values())

    @property
    def content_digest(self) -> str:
        """sha256 over the files' names and recorded sha256s (sorted): the version's content address."""
        h = hashlib.sha256()
        for fname in sorted(self.files):
            h.update(f"{fname}\x00{self.files[fname]['sha256']}\x00".encode())
        return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically: temp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def copy_hashed(src: Path, dst: Path) -> dict:
    """Copy one file, fsync it, and return {"sha256", "size"} of what was written."""
    digest = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            fout.write(chunk)
            size += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return {"sha256": digest.hexdigest(), "size": size}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class AdapterStore:
    """Versioned adapter directories with atomic commits; thread-safe. Opening it recovers from crashes."""

    def __init__(self, root: Path, files: tuple[str, ...] = ("adapter_config.json", "adapter_model.safetensors")):
        self.root = Path(root)
        self.files = files
        self._lock = threading.Lock()
        self._versions: dict[tuple[str, str], list[StoredVersion]] = {}  # ascending by version
        self._deleted_through: dict[tuple[str, str], int] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        self._recover()

    # ---- reading -------------------------------------------------------------------------------
    def names(self) -> list[tuple[str, str]]:
        """(tenant, name) of every adapter with at least one visible version, sorted."""
        with self._lock:
            return sorted(k for k, v in self._versions.items() if v)

    def versions(self, tenant: str, name: str) -> list[StoredVersion]:
        with self._lock:
            return list(self._versions.get((tenant, name), ()))

    def latest(self, tenant: str, name: str) -> StoredVersion | None:
        with self._lock:
            found = self._versions.get((tenant, name))
            return found[-1] if found else None

    def verify(self, stored: StoredVersion) -> None:
        """Check every file of a version against its recorded sha256; raises StoreError."""
        for fname, rec in stored.files.items():
            path = stored.path / fname
            if not path.is_file():
                raise StoreError(f"{stored.tenant}/{stored.name}@{stored.version}: {fname} is missing")
            if sha256_file(path) != rec["sha256"]:
                raise StoreError(f"{stored.tenant}/{stored.name}@{stored.version}: {fname} fails its sha256 check")

    # ---- writing -------------------------------------------------------------------------------
    def put(self, tenant: str, name: str, src_dir: Path, *, shared: bool = False, meta: dict | None = None
            ) -> StoredVersion:
        """Store the files of `src_dir` as the next version of tenant/name; visible only once complete."""
        check_name("tenant", tenant)
        check_name("adapter", name)
        src_dir = Path(src_dir)
        for fname in self.files:
            if not (src_dir / fname).is_file():
                raise StoreError(f"{fname} is missing from {src_dir}")
        staging = self.root / STAGING / uuid.uuid4().hex
        staging.mkdir(parents=True)
        try:
            files = {fname: copy_hashed(src_dir / fname, staging / fname) for fname in self.files}
            created = time.time()
            with self._lock:
                key = (tenant, name)
                existing = self._versions.get(key, [])
                version = max([v.version for v in existing] + [self._deleted_through.get(key, 0)]) + 1
                manifest = {"tenant": tenant, "name": name, "version": version, "created_at": created,
                            "shared": bool(shared), "files": files, "meta": meta or {}}
                write_atomic(staging / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
                fsync_dir(staging)
                name_dir = self._name_dir(tenant, name)
                final = name_dir / f"v{version:06d}"
                os.rename(staging, final)  # the commit point
                fsync_dir(name_dir)
                stored = _from_manifest(final, manifest)
                self._versions.setdefault(key, []).append(stored)
            return stored
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def delete(self, tenant: str, name: str) -> list[StoredVersion]:
        """Delete every version of tenant/name (atomically invisible first); returns what was removed."""
        with self._lock:
            key = (tenant, name)
            gone = self._versions.get(key, [])
            if not gone:
                return []
            through = gone[-1].version
            name_dir = self.root / tenant / name
            write_atomic(name_dir / DELETED_THROUGH, str(through).encode())
            self._deleted_through[key] = through
            self._versions[key] = []
        for stored in gone:
            _remove_tree(stored.path, self.root / STAGING)
        return gone

    # ---- crash recovery ------------------------------------------------------------------------
    def _name_dir(self, tenant: str, name: str) -> Path:
        tenant_dir = self.root / tenant
        if not tenant_dir.is_dir():
            tenant_dir.mkdir(exist_ok=True)
            fsync_dir(self.root)
        name_dir = tenant_dir / name
        if not name_dir.is_dir():
            name_dir.mkdir(exist_ok=True)
            fsync_dir(tenant_dir)
        return name_dir

    def _recover(self) -> None:
        """Remove leftovers of interrupted writes and deletions; index the committed versions."""
        shutil.rmtree(self.root / STAGING, ignore_errors=True)
        for tenant_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name)):
            for name_dir in sorted(p for p in tenant_dir.iterdir() if p.is_dir() and _NAME.match(p.name)):
                self._recover_name(tenant_dir.name, name_dir)

    def _recover_name(self, tenant: str, name_dir: Path) -> None:
        key = (tenant, name_dir.name)
        for tmp in name_dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        through = 0
        marker = name_dir / DELETED_THROUGH
        if marker.is_file():
            try:
                through = int(marker.read_text().strip())
            except ValueError:
                raise StoreError(f"{marker} is corrupt") from None
        self._deleted_through[key] = through
        found: list[StoredVersion] = []
        for vdir in sorted(name_dir.iterdir()):
            m = _VERSION_DIR.match(vdir.name)
            if m is None or not vdir.is_dir():
                continue
            if int(m[1]) <= through:  # a deletion was interrupted: finish it
                _remove_tree(vdir, self.root / STAGING)
                continue
            try:
                manifest = json.loads((vdir / MANIFEST).read_text())
                found.append(_from_manifest(vdir, manifest))
            except (OSError, ValueError, KeyError) as exc:
                raise StoreError(f"{vdir} is committed but its manifest is unreadable: {exc}") from None
        self._versions[key] = sorted(found, key=lambda s: s.version)


def _from_manifest(path: Path, manifest: dict) -> StoredVersion:
    return StoredVersion(tenant=manifest["tenant"], name=manifest["name"], version=int(manifest["version"]),
                         path=path, created_at=float(manifest["created_at"]), shared=bool(manifest["shared"]),
                         files=dict(manifest["files"]), meta=dict(manifest.get("meta") or {}))


def _remove_tree(path: Path, trash_root: Path) -> None:
    """Move a directory out of sight in one rename, then delete it."""
    trash_root.mkdir(exist_ok=True)
    trash = trash_root / f"del-{uuid.uuid4().hex}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)
