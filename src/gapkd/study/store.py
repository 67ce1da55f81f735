"""The study result store: one SQLite row per run (stdlib sqlite3).

Rows are keyed by (study, config_hash) and written with INSERT OR REPLACE inside an immediate
transaction, so any number of workers may write the same database without duplicating a row.
WAL mode lets readers (status, report) work while workers write; a busy timeout makes writers
wait for each other instead of failing. Every run directory also holds its summary.json, so the
store can always be rebuilt from the run directories (the report does that for missing rows).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Optional

#: summary.json metrics kept as columns (the whole summary is also kept as JSON)
METRIC_COLUMNS = {
    "best_val_acc": "REAL", "best_epoch": "INTEGER", "test_acc_at_best_val": "REAL", "last_val_acc": "REAL",
    "last_test_acc": "REAL", "epochs": "INTEGER", "train_seconds": "REAL", "skipped_steps": "INTEGER",
    "teacher_val_acc": "REAL", "teacher_test_acc": "REAL",
}
COLUMNS = {
    "study": "TEXT NOT NULL", "config_hash": "TEXT NOT NULL", "run_name": "TEXT NOT NULL", "role": "TEXT NOT NULL",
    "dataset": "TEXT", "model": "TEXT", "teacher": "TEXT", "pair": "TEXT", "method": "TEXT", "method_name": "TEXT",
    "pipeline": "TEXT", "seed": "INTEGER", "hparams": "TEXT", "budget": "TEXT", "teacher_hash": "TEXT", "params": "INTEGER",
    "config": "TEXT", "code_version": "TEXT", "status": "TEXT NOT NULL", "error": "TEXT", "worker": "TEXT",
    "run_dir": "TEXT", "started_at": "REAL", "finished_at": "REAL", "wall_seconds": "REAL",
    **METRIC_COLUMNS, "summary": "TEXT",
}
JSON_COLUMNS = ("hparams", "config", "summary")
BUSY_TIMEOUT_S = 120


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_alive(worker: Optional[str]) -> Optional[bool]:
    """Whether the worker ``host:pid`` still runs: known only on its own host (None elsewhere)."""
    host, _, pid = (worker or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class ResultStore:
    """One connection per worker (and per thread): open it where it is used."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
            self._retry_while_locked(lambda: self._db.execute("PRAGMA journal_mode = WAL"))
            columns = ", ".join(f"{name} {kind}" for name, kind in COLUMNS.items())
            with self._transaction():
                self._db.execute(f"CREATE TABLE IF NOT EXISTS runs ({columns}, PRIMARY KEY (study, config_hash))")
            self._db.execute("SELECT count(*) FROM runs").fetchone()
        except sqlite3.DatabaseError as error:
            if isinstance(error, sqlite3.OperationalError) and "locked" in str(error):
                raise
            self._db.close()
            from ..core.errors import GapkdError  # here: this module also runs alone (stdlib only), as tests' writer processes

            raise GapkdError(
                f"the study database {self.path} is damaged ({error}). Move it aside (mv {self.path} {self.path}.broken) "
                "and run the command again: a new one is made, `gapkd study run` skips the finished runs, and "
                "`gapkd study report` rebuilds their rows from each run folder's summary.json."
            ) from None

    @staticmethod
    def _retry_while_locked(statement) -> None:
        """Run ``statement`` again while another connection holds the lock it needs. SQLite does not
        call the busy handler for some lock upgrades (switching a new database to WAL while another
        process opens it), so those fail at once with 'database is locked' however long the timeout."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                statement()
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self):
        self._db.execute("BEGIN IMMEDIATE")  # take the write lock now, not half-way through
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ------------------------------------------------------------ writing
    def upsert(self, row: dict[str, Any], *, unless_done: bool = False) -> bool:
        """INSERT OR REPLACE one row; with ``unless_done`` a finished row is left alone. True if written."""
        values = {name: _encode(name, row.get(name)) for name in COLUMNS}
        with self._transaction():
            if unless_done:
                current = self._db.execute("SELECT status FROM runs WHERE study = ? AND config_hash = ?",
                                           (values["study"], values["config_hash"])).fetchone()
                if current is not None and current["status"] == "done":
                    return False
            placeholders = ", ".join("?" for _ in COLUMNS)
            self._db.execute(f"INSERT OR REPLACE INTO runs ({', '.join(COLUMNS)}) VALUES ({placeholders})", list(values.values()))
        return True

    def mark_running(self, row: dict[str, Any]) -> bool:
        return self.upsert({"started_at": time.time(), **row, "status": "running", "worker": worker_id(),
                            "error": None, "finished_at": None}, unless_done=True)

    def mark_done(self, row: dict[str, Any], summary: dict[str, Any], wall_seconds: Optional[float] = None) -> None:
        metrics = {name: summary.get(name) for name in METRIC_COLUMNS}
        self.upsert({**row, **metrics, "summary": summary, "status": "done", "error": None, "finished_at": time.time(),
                     "wall_seconds": wall_seconds if wall_seconds is not None else summary.get("train_seconds")})

    def mark_failed(self, row: dict[str, Any], error: str, status: str = "failed") -> None:
        self.upsert({**row, "status": status, "error": error, "finished_at": time.time()}, unless_done=True)

    # ------------------------------------------------------------ reading
    def rows(self, study: str, *, budget: Optional[str] = None, status: Optional[str] = None) -> list[dict[str, Any]]:
        query, args = "SELECT * FROM runs WHERE study = ?", [study]
        if budget is not None:
            query, args = query + " AND budget = ?", args + [budget]
        if status is not None:
            query, args = query + " AND status = ?", args + [status]
        return [_decode(dict(r)) for r in self._db.execute(query + " ORDER BY role DESC, run_name", args)]

    def statuses(self, study: str, keys: Iterable[str]) -> dict[str, str]:
        """config_hash -> status for the given keys (absent keys have no row)."""
        found = {r["config_hash"]: r["status"] for r in self._db.execute("SELECT config_hash, status FROM runs WHERE study = ?", (study,))}
        return {key: found[key] for key in keys if key in found}


def _encode(name: str, value: Any) -> Any:
    if name in JSON_COLUMNS and value is not None:
        return json.dumps(value, sort_keys=True)
    return value


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    for name in JSON_COLUMNS:
        if row.get(name) is not None:
            row[name] = json.loads(row[name])
    return row
