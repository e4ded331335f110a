"""Receiving an uploaded adapter: spool the streamed bytes (size caps, sha256) and unpack the tar safely.

The payload is a tar (optionally gzip-compressed) holding exactly `adapter_config.json` and
`adapter_model.safetensors`, at the top level or under one directory. Refused: absolute paths, `..`,
links, devices and FIFOs, any other file (pickled `adapter_model.bin` named as such), duplicates, and
anything beyond the size cap. Members are copied out by hand (never `TarFile.extract`), counting the
bytes actually read rather than trusting the headers. Everything is written under the store's staging
directory, which is removed when the store reopens, so a refused or interrupted upload leaves nothing.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import uuid
import zlib
from pathlib import Path, PurePosixPath

from server.adapters.errors import AdapterRejected
from server.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from server.clip import clip

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COPY_CHUNK = 1 << 20


class UploadRefused(AdapterRejected):
    """The upload is malformed (INVALID_ARGUMENT); the message says what is wrong."""


class UploadTooLarge(UploadRefused):
    """A chunk or the whole upload exceeds the configured cap (RESOURCE_EXHAUSTED)."""


def check_sha256(value: str) -> str:
    value = (value or "").strip().lower()
    if not _SHA256.match(value):
        raise UploadRefused(f"sha256 must be 64 hex digits, got {value[:80]!r}")
    return value


class UploadSpool:
    """A scratch directory receiving one upload: `write()` the chunks, `finish()` checks size and hash.

    Use as a context manager: the directory is removed on exit, whatever happened."""

    def __init__(self, staging_root: Path, *, max_bytes: int, max_chunk_bytes: int,
                 expected_bytes: int | None = None) -> None:
        self.dir = Path(staging_root) / f"upload-{uuid.uuid4().hex}"
        self.max_bytes = max_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self.expected_bytes = expected_bytes or None
        if self.expected_bytes is not None and self.expected_bytes > max_bytes:
            raise UploadTooLarge(f"the upload declares {self.expected_bytes} bytes; the limit is {max_bytes}")
        self.size = 0
        self._digest = hashlib.sha256()
        self.dir.mkdir(parents=True)
        self.payload = self.dir / "payload.tar"
        self._file = open(self.payload, "wb")  # noqa: SIM115 - closed in finish() / __exit__

    def __enter__(self) -> UploadSpool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, data: bytes) -> None:
        if len(data) > self.max_chunk_bytes:
            raise UploadTooLarge(f"a chunk of {len(data)} bytes exceeds the chunk limit of {self.max_chunk_bytes}")
        self.size += len(data)
        if self.size > self.max_bytes:
            raise UploadTooLarge(f"the upload exceeds the limit of {self.max_bytes} bytes")
        self._digest.update(data)
        self._file.write(data)

    def finish(self, expected_sha256: str) -> Path:
        """Close the payload; check its size and sha256; return the payload path."""
        self._file.close()
        if self.size == 0:
            raise UploadRefused("the upload carried no data after the metadata")
        if self.expected_bytes is not None and self.size != self.expected_bytes:
            raise UploadRefused(f"the upload declared {self.expected_bytes} bytes but carried {self.size} "
                                "(truncated or padded)")
        actual = self._digest.hexdigest()
        if actual != expected_sha256:
            raise UploadRefused(f"sha256 mismatch: the metadata says {expected_sha256}, the data hashes to {actual}")
        return self.payload

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _member_file(member: tarfile.TarInfo) -> str | None:
    """The adapter file a member is, None for a harmless directory entry; raises UploadRefused."""
    raw = member.name
    path = PurePosixPath(raw)
    if raw.startswith("/") or path.is_absolute() or re.match(r"^[A-Za-z]:", raw):
        raise UploadRefused(f"absolute path {clip(raw)} in the tar")
    parts = [p for p in path.parts if p not in ("", ".")]
    if ".." in parts or "\\" in raw:
        raise UploadRefused(f"path {clip(raw)} in the tar leaves the adapter directory")
    if member.issym() or member.islnk():
        raise UploadRefused(f"link {clip(raw)} -> {clip(member.linkname)} in the tar; links are refused")
    if member.isdir():
        if len(parts) > 1:
            raise UploadRefused(f"nested directory {clip(raw)} in the tar")
        return None
    if not member.isreg():
        raise UploadRefused(f"{clip(raw)} in the tar is not a regular file (device, FIFO ...); refused")
    if not parts or len(parts) > 2:
        raise UploadRefused(f"{clip(raw)}: adapter files must be at the top of the tar or under one directory")
    name = parts[-1]
    if name == "adapter_model.bin":
        raise UploadRefused("pickled adapter_model.bin weights are refused; save with safetensors")
    if name not in ADAPTER_FILES:
        raise UploadRefused(f"unexpected file {clip(raw)} in the tar; only {' and '.join(ADAPTER_FILES)} are accepted")
    return name


def extract_adapter_tar(tar_path: Path, dest: Path, *, max_bytes: int) -> Path:
    """Unpack the two adapter files of `tar_path` into `dest` (created); returns `dest`."""
    dest.mkdir(parents=True)
    seen: set[str] = set()
    total = 0
    try:
        with tarfile.open(tar_path, mode="r:*") as tar:
            for member in tar:
                name = _member_file(member)
                if name is None:
                    continue
                if name in seen:
                    raise UploadRefused(f"{name} appears twice in the tar")
                seen.add(name)
                src = tar.extractfile(member)
                if src is None:
                    raise UploadRefused(f"{clip(member.name)} cannot be read from the tar")
                with src, open(dest / name, "wb") as out:
                    while chunk := src.read(_COPY_CHUNK):
                        total += len(chunk)
                        if total > max_bytes:
                            raise UploadTooLarge(f"the unpacked adapter exceeds the limit of {max_bytes} bytes")
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise UploadRefused(f"the payload is not a valid tar archive (truncated or corrupt?): {exc}") from None
    missing = [f for f in ADAPTER_FILES if f not in seen]
    if missing:
        raise UploadRefused(f"the tar lacks {' and '.join(missing)}")
    return dest
