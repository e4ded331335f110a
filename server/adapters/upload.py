"""Receiving an uploaded adapter: spool the streamed bytes (size caps, sha256) and unpack the tar safely.

The payload is a tar (optionally gzip-compressed) holding exactly `adapter_config.json` and the weights,
`adapter_model.safetensors` (PEFT's name) or `adapter.safetensors` (AdapterHub's; stored under PEFT's name), at
the top level or under one directory. Refused: absolute paths, `..`, links, devices and FIFOs, any other file
(pickled `adapter_model.bin` / `pytorch_adapter.bin` named as such), two weights files, duplicates, and
anything beyond the size cap. Members are copied out by hand (never `TarFile.extract`), counting the
bytes actually read rather than trusting the headers. Everything is written under the store's staging
directory, which is removed when the store reopens, so a refused or interrupted upload leaves nothing.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import re
import shutil
import tarfile
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from server.adapters.errors import AdapterRejected
from server.adapters.peft_format import ADAPTERHUB_WEIGHTS_FILE, CONFIG_FILE, WEIGHTS_FILE
from server.clip import clip

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # what an unpacked upload holds
WEIGHTS_NAMES = (WEIGHTS_FILE, ADAPTERHUB_WEIGHTS_FILE)  # the weights' accepted names in the tar
MAX_MEMBERS = 8  # tar entries (the two files, a directory, a few harmless extras); pax headers not counted
MAX_EXTENDED_HEADER_BYTES = 64 << 10  # a pax extended header or a GNU long name / long link
WeightsCheck = Callable[[BinaryIO, int], int]  # (stream at the file's start, its size) -> header bytes read
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COPY_CHUNK = 1 << 20


class UploadRefused(AdapterRejected):
    """The upload is malformed (INVALID_ARGUMENT); the message says what is wrong."""


class UploadTooLarge(UploadRefused):
    """A chunk, the whole upload or its unpacked size exceeds the configured cap (RESOURCE_EXHAUSTED)."""


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
    if not member.isreg() or member.issparse():
        raise UploadRefused(f"{clip(raw)} in the tar is not a regular file (device, FIFO, sparse ...); refused")
    if not parts or len(parts) > 2:
        raise UploadRefused(f"{clip(raw)}: adapter files must be at the top of the tar or under one directory")
    name = parts[-1]
    if name in ("adapter_model.bin", "pytorch_adapter.bin"):
        raise UploadRefused(f"pickled {name} weights are refused; save with safetensors")
    if name not in (CONFIG_FILE, *WEIGHTS_NAMES):
        raise UploadRefused(f"unexpected file {clip(raw)} in the tar; only {CONFIG_FILE} and "
                            f"{' or '.join(WEIGHTS_NAMES)} are accepted")
    return name


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses a pax extended header or GNU long name larger than MAX_EXTENDED_HEADER_BYTES before tarfile
    reads it whole into memory (tarfile would otherwise trust the header's size field)."""

    def _proc_member(self, tarfile_):
        extended = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                    tarfile.GNUTYPE_LONGLINK)
        if self.type in extended and self.size > MAX_EXTENDED_HEADER_BYTES:
            raise UploadRefused(f"an extended tar header of {self.size} bytes; the limit is "
                                f"{MAX_EXTENDED_HEADER_BYTES} (names and metadata are short)")
        return super()._proc_member(tarfile_)


class _Bounded:
    """A read-only stream that refuses to yield more than `limit` bytes (the decompressed tar)."""

    def __init__(self, raw: BinaryIO, limit: int) -> None:
        self.raw, self.limit, self.count = raw, limit, 0

    def read(self, n: int = -1) -> bytes:
        want = self.limit - self.count + 1 if n is None or n < 0 else min(n, self.limit - self.count + 1)
        data = self.raw.read(want)
        self.count += len(data)
        if self.count > self.limit:
            raise UploadTooLarge(f"the unpacked upload exceeds the limit of {self.limit} bytes")
        return data


def _open_decompressed(path: Path) -> BinaryIO:
    """The payload as an uncompressed byte stream (gzip, bzip2 and xz are recognized by their magic)."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.open(path, "rb")
    if magic.startswith(b"BZh"):
        return bz2.open(path, "rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.open(path, "rb")
    return open(path, "rb")  # noqa: SIM115 - closed by the caller


def extract_adapter_tar(tar_path: Path, dest: Path, *, max_bytes: int, max_unpacked_bytes: int | None = None,
                        check_weights: WeightsCheck | None = None) -> Path:
    """Unpack the two adapter files of `tar_path` into `dest` (created); returns `dest`.

    Streaming, with every limit checked before the bytes it guards are read: at most MAX_MEMBERS entries,
    extended headers of at most MAX_EXTENDED_HEADER_BYTES, `max_unpacked_bytes` of decompressed tar
    (default `max_bytes` + 1 MiB), `max_bytes` of file data; `check_weights` (validation of the
    safetensors header against the base) runs on the weights file's first bytes, before the rest is read."""
    dest.mkdir(parents=True)
    seen: set[str] = set()  # stored names
    seen_names: set[str] = set()  # names in the tar
    total = members = 0
    unpacked = max_unpacked_bytes if max_unpacked_bytes is not None else max_bytes + (1 << 20)
    try:
        with _open_decompressed(tar_path) as raw, \
                tarfile.open(fileobj=_Bounded(raw, unpacked), mode="r|", tarinfo=_BoundedTarInfo) as tar:
            for member in tar:
                members += 1
                if members > MAX_MEMBERS:
                    raise UploadRefused(f"the tar has more than {MAX_MEMBERS} entries; an adapter is two files")
                name = _member_file(member)
                if name is None:
                    continue
                stored = WEIGHTS_FILE if name in WEIGHTS_NAMES else name
                if stored in seen:
                    twice = f"{name} appears twice" if name in seen_names else f"{' and '.join(WEIGHTS_NAMES)} both"
                    raise UploadRefused(f"{twice} in the tar; an adapter has one weights file")
                seen.add(stored)
                seen_names.add(name)
                if total + member.size > max_bytes:
                    raise UploadTooLarge(f"the unpacked adapter exceeds the limit of {max_bytes} bytes")
                src = tar.extractfile(member)
                if src is None:
                    raise UploadRefused(f"{clip(member.name)} cannot be read from the tar")
                with src, open(dest / stored, "wb") as out:
                    head = b""
                    if stored == WEIGHTS_FILE and check_weights is not None:
                        head = _checked_head(src, member.size, check_weights)
                        out.write(head)
                    total += len(head) + _copy(src, out, max_bytes - total - len(head))
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
        raise UploadRefused(f"the payload is not a valid tar archive (truncated or corrupt?): {clip(str(exc))}"
                            ) from None
    missing = [f if f == CONFIG_FILE else " or ".join(WEIGHTS_NAMES) for f in ADAPTER_FILES if f not in seen]
    if missing:
        raise UploadRefused(f"the tar lacks {' and '.join(missing)}")
    return dest


class _Recording:
    """Reads through to `src`, keeping what was read (so the header bytes still reach the output file)."""

    def __init__(self, src) -> None:
        self.src, self.seen = src, bytearray()

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        self.seen += data
        return data


def _checked_head(src, size: int, check: WeightsCheck) -> bytes:
    recorder = _Recording(src)
    check(recorder, size)
    return bytes(recorder.seen)


def _copy(src, out, budget: int) -> int:
    copied = 0
    while chunk := src.read(_COPY_CHUNK):
        copied += len(chunk)
        if copied > budget:
            raise UploadTooLarge("the unpacked adapter exceeds the upload limit")
        out.write(chunk)
    out.flush()
    os.fsync(out.fileno())
    return copied
