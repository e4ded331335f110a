"""Usage accounting: prompt / completion tokens and requests per tenant, adapter and minute, in SQLite.

`record()` (any thread) adds to an in-memory table; a flusher thread writes it to `usage.sqlite` (WAL
journal) every `flush_interval_s` (0.5 s by default), one transaction per flush, adding to the rows of
the same minute. A SIGKILL loses at most what was recorded since the last flush (under a second); a
clean `close()` loses nothing. `query()` flushes first, so it sees every recorded request.

Schema: usage(tenant, adapter, minute, prompt_tokens, completion_tokens, requests, cached_prompt_tokens),
primary key (tenant, adapter, minute); minute = unix seconds // 60 * 60; adapter "" = the base model;
cached_prompt_tokens: of prompt_tokens, those served from the prefix cache (billing may discount them). A file
made before that column existed gains it on open (ALTER TABLE ADD COLUMN, default 0: nothing else changes).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    tenant TEXT NOT NULL,
    adapter TEXT NOT NULL,
    minute INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    cached_prompt_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, adapter, minute)
) WITHOUT ROWID
"""
UPSERT = """
INSERT INTO usage (tenant, adapter, minute, prompt_tokens, completion_tokens, requests, cached_prompt_tokens)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (tenant, adapter, minute) DO UPDATE SET
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    requests = requests + excluded.requests,
    cached_prompt_tokens = cached_prompt_tokens + excluded.cached_prompt_tokens
"""
ADDED_COLUMNS = (("cached_prompt_tokens", "INTEGER NOT NULL DEFAULT 0"),)  # columns newer than the first schema


def migrate(db: sqlite3.Connection) -> list[str]:
    """Add the columns an older file lacks, in one immediate transaction (a second process opening the same file
    waits, then finds them); the names added."""
    db.execute("BEGIN IMMEDIATE")
    try:
        have = {row[1] for row in db.execute("PRAGMA table_info(usage)")}
        added = [name for name, _ in ADDED_COLUMNS if name not in have]
        for name, decl in ADDED_COLUMNS:
            if name in added:
                db.execute(f"ALTER TABLE usage ADD COLUMN {name} {decl}")
        db.execute("COMMIT")
    except sqlite3.Error:
        db.execute("ROLLBACK")
        raise
    return added


def private_file(path: Path) -> None:
    """`path` exists with mode 0600 (created so, or an older world-readable file narrowed): usage names every
    tenant, adapter and its traffic."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):  # left by an older version or a crash
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.chmod(side, 0o600)


@dataclass(frozen=True, slots=True)
class UsageRow:
    tenant: str
    adapter: str  # "" = the base model
    minute: int  # unix seconds of the minute's start
    prompt_tokens: int
    completion_tokens: int
    requests: int
    cached_prompt_tokens: int = 0  # of prompt_tokens, those served from the prefix cache


class UsageRecorder:
    def __init__(self, path: Path, flush_interval_s: float = 0.5) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flush_interval_s = flush_interval_s
        self._pending: dict[tuple[str, str, int], list[int]] = {}  # -> [prompt, completion, requests, cached]
        self._lock = threading.Lock()  # guards _pending
        self._db_lock = threading.Lock()  # one writer / reader on the connection at a time
        private_file(self.path)  # SQLite gives its -wal and -shm files the database file's mode
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process kill
        self._db.execute(SCHEMA)
        if added := migrate(self._db):
            log.info("usage file %s: added columns %s", self.path, ", ".join(added))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="usage-flusher", daemon=True)
        self._thread.start()

    def record(self, tenant: str, adapter: str, prompt_tokens: int, completion_tokens: int,
               at: float | None = None, *, cached_prompt_tokens: int = 0) -> None:
        """One request; `cached_prompt_tokens`: of `prompt_tokens`, those served from the prefix cache."""
        minute = int(time.time() if at is None else at) // 60 * 60
        with self._lock:
            row = self._pending.setdefault((tenant, adapter, minute), [0, 0, 0, 0])
            row[0] += prompt_tokens
            row[1] += completion_tokens
            row[2] += 1
            row[3] += cached_prompt_tokens

    def flush(self) -> int:
        """Write what was recorded since the last flush; the number of rows written."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return 0
        rows = [(t, a, m, p, c, r, k) for (t, a, m), (p, c, r, k) in pending.items()]
        with self._db_lock:
            try:
                self._db.execute("BEGIN")
                self._db.executemany(UPSERT, rows)
                self._db.execute("COMMIT")
            except sqlite3.Error:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                with self._lock:  # keep them for the next try
                    for (t, a, m, *counts) in rows:
                        row = self._pending.setdefault((t, a, m), [0, 0, 0, 0])
                        row[:] = [x + y for x, y in zip(row, counts, strict=True)]
                raise
        return len(rows)

    def query(self, tenant: str | None, start: int | None = None, end: int | None = None) -> list[UsageRow]:
        """Rows of `tenant` (None = every tenant) whose minute lies in [start, end) (unix seconds; None = open)."""
        self.flush()
        sql = ("SELECT tenant, adapter, minute, prompt_tokens, completion_tokens, requests, cached_prompt_tokens "
               "FROM usage WHERE 1=1")
        args: list = []
        if tenant is not None:
            sql += " AND tenant = ?"
            args.append(tenant)
        if start is not None:
            sql += " AND minute >= ?"
            args.append(start // 60 * 60)
        if end is not None:
            sql += " AND minute < ?"
            args.append(end)
        sql += " ORDER BY minute, tenant, adapter"
        with self._db_lock:
            return [UsageRow(*row) for row in self._db.execute(sql, args).fetchall()]

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            try:
                self.flush()
            except sqlite3.Error:
                log.exception("writing usage to %s failed (kept in memory, retried)", self.path)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.flush()
        finally:
            with self._db_lock:
                self._db.close()
