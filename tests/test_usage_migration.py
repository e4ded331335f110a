"""usage.sqlite's cached_prompt_tokens column: a file made by the first schema (no such column) gains it on open
with its rows intact, once (a second open, or a second process racing the first, adds nothing), and the new
column adds up like the others."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from server.usage import UsageRecorder, migrate

OLD_SCHEMA = """
CREATE TABLE usage (
    tenant TEXT NOT NULL,
    adapter TEXT NOT NULL,
    minute INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, adapter, minute)
) WITHOUT ROWID
"""  # the schema usage.sqlite files were written with before cached_prompt_tokens


def _old_file(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(OLD_SCHEMA)
    db.executemany("INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?)",
                   [("a", "", 120, 10, 5, 2), ("a", "a/x", 180, 7, 1, 1), ("b", "", 60, 3, 3, 1)])
    db.commit()
    db.close()


def _columns(path: Path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return [row[1] for row in db.execute("PRAGMA table_info(usage)")]
    finally:
        db.close()


def test_an_old_file_gains_the_column_and_keeps_its_rows(tmp_path: Path) -> None:
    db = tmp_path / "usage.sqlite"
    _old_file(db)
    assert "cached_prompt_tokens" not in _columns(db)
    rec = UsageRecorder(db, flush_interval_s=60)
    old = [(r.tenant, r.adapter, r.minute, r.prompt_tokens, r.completion_tokens, r.requests, r.cached_prompt_tokens)
           for r in rec.query(None)]
    assert old == [("b", "", 60, 3, 3, 1, 0), ("a", "", 120, 10, 5, 2, 0), ("a", "a/x", 180, 7, 1, 1, 0)]
    rec.record("a", "", 40, 2, at=130, cached_prompt_tokens=32)  # adds to the migrated row of that minute
    rec.record("a", "", 40, 2, at=131)
    rec.record("c", "", 16, 1, at=200, cached_prompt_tokens=16)
    rec.close()
    assert _columns(db)[-1] == "cached_prompt_tokens"
    again = UsageRecorder(db, flush_interval_s=60)  # reopening migrates nothing
    rows = {(r.tenant, r.minute): r for r in again.query(None)}
    assert (rows["a", 120].prompt_tokens, rows["a", 120].requests, rows["a", 120].cached_prompt_tokens) == (90, 4, 32)
    assert rows["c", 180].cached_prompt_tokens == 16 and rows["b", 60].cached_prompt_tokens == 0
    again.close()
    assert _columns(db).count("cached_prompt_tokens") == 1


def test_migration_runs_once_under_concurrent_opens(tmp_path: Path) -> None:
    db = tmp_path / "usage.sqlite"
    _old_file(db)
    added: list[list[str]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_one() -> None:
        conn = sqlite3.connect(db, isolation_level=None, timeout=10)
        try:
            start.wait()
            added.append(migrate(conn))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(added) == [[], [], [], ["cached_prompt_tokens"]]
    assert _columns(db).count("cached_prompt_tokens") == 1


class _FailingWrites:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __getattr__(self, name: str):
        return getattr(self.db, name)

    def execute(self, sql: str, *args):
        return self.db.execute(sql, *args)

    def executemany(self, sql: str, rows):
        raise sqlite3.OperationalError("disk I/O error")


def test_a_new_file_has_the_column_and_a_failed_flush_keeps_the_cached_count(tmp_path: Path) -> None:
    db = tmp_path / "usage.sqlite"
    rec = UsageRecorder(db, flush_interval_s=60)
    assert migrate(rec._db) == []  # created with the current schema
    rec.record("a", "", 40, 2, at=60, cached_prompt_tokens=32)
    real = rec._db
    rec._db = _FailingWrites(real)  # the flush fails: its rows stay pending, every count with them
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        rec.flush()
    rec._db = real
    rec.record("a", "", 40, 2, at=61, cached_prompt_tokens=8)
    [row] = rec.query("a")
    assert (row.prompt_tokens, row.requests, row.cached_prompt_tokens) == (80, 2, 40)
    rec.close()
