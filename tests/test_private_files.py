"""Files that name tenants are private: usage.sqlite and its WAL / SHM files are 0600 (a world-readable one
left by an older version is narrowed), and a group- or world-readable tenants file is warned about."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from server.tenants import TenantDirectory, hash_key, new_key
from server.usage import UsageRecorder


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_usage_database_and_its_wal_files_are_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the usual umask: without care SQLite's files come out 0644
    try:
        db = tmp_path / "usage.sqlite"
        rec = UsageRecorder(db, flush_interval_s=60)
        rec.record("acme", "", 3, 4)
        rec.flush()
        files = [db, db.with_name("usage.sqlite-wal"), db.with_name("usage.sqlite-shm")]
        assert all(f.exists() for f in files)
        assert {f.name: _mode(f) for f in files} == {f.name: 0o600 for f in files}
        rec.close()
        os.chmod(db, 0o644)  # as an older version left it
        again = UsageRecorder(db, flush_interval_s=60)
        assert _mode(db) == 0o600 and again.query("acme")[0].completion_tokens == 4
        again.close()
    finally:
        os.umask(old)


def test_a_readable_tenants_file_is_warned_about(tmp_path: Path, caplog) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text(f'[tenants.acme]\nkey_sha256 = "{hash_key(new_key())}"\n')
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="server.tenants"):
        TenantDirectory.from_file(path)
    assert any("chmod 600" in r.getMessage() and "mode 644" in r.getMessage() for r in caplog.records)
    caplog.clear()
    os.chmod(path, 0o600)
    with caplog.at_level(logging.WARNING, logger="server.tenants"):
        TenantDirectory.from_file(path)
    assert not caplog.records
