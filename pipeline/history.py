"""The history store: every fleet run and each GPU's result in it, in SQLite (WAL mode, versioned schema).

    runs       one row per fleet run (started, finished, target, summary file, exit code)
    results    one row per host/GPU of a run: host, GPU index/UUID/model, status, verdict, failed step, duration,
               report path
    metrics    (result, name) -> value       see pipeline/gpu_result.py for the names
    scenarios  (result, name) -> passed
    versions   (result, name) -> value       driver, cuda, torch, triton, transformers, python, gpu_uuid, code,
                                             revision

The default file is `history.sqlite` beside the reports (`default_path(report_dir)`); any other path can be given
(`--history FILE`, or the inventory's `history:` key). WAL lets readers (`flashcore-deploy history`) run while
a nightly writes, and several writers wait for each other (busy timeout) instead of failing. WAL needs a local
filesystem (not NFS).

Schema versions: `PRAGMA user_version` holds how many entries of MIGRATIONS have been applied; opening a file
applies the missing ones, each in one transaction that also bumps user_version (so a crash leaves the old version,
and two processes opening a new file at once apply each migration once). A file newer than this code is refused.
To change the schema, append a migration; never edit one that has shipped.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from pipeline.errors import UsageError
from pipeline.gpu_result import GpuResult

DEFAULT_NAME = "history.sqlite"
BUSY_TIMEOUT_S = 30.0

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: runs, per-GPU results, metrics, scenario verdicts, versions
        """CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            started_at TEXT NOT NULL,
            finished_at TEXT NOT NULL DEFAULT '',
            target TEXT NOT NULL DEFAULT '',
            summary TEXT NOT NULL DEFAULT '',
            exit_code INTEGER)""",
        """CREATE TABLE results (
            id INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            host TEXT NOT NULL,
            gpu_index INTEGER,
            gpu_uuid TEXT NOT NULL DEFAULT '',
            gpu_name TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL,
            verdict TEXT NOT NULL DEFAULT '',
            failed_step TEXT NOT NULL DEFAULT '',
            exit_code INTEGER NOT NULL DEFAULT 0,
            duration_s REAL NOT NULL DEFAULT 0,
            started_at TEXT NOT NULL DEFAULT '',
            report TEXT NOT NULL DEFAULT '',
            note TEXT NOT NULL DEFAULT '')""",
        "CREATE INDEX results_by_host_model ON results(host, gpu_name, started_at)",
        "CREATE INDEX results_by_uuid ON results(gpu_uuid, started_at)",
        """CREATE TABLE metrics (
            result_id INTEGER NOT NULL REFERENCES results(id) ON DELETE CASCADE,
            name TEXT NOT NULL, value REAL NOT NULL, PRIMARY KEY (result_id, name)) WITHOUT ROWID""",
        """CREATE TABLE scenarios (
            result_id INTEGER NOT NULL REFERENCES results(id) ON DELETE CASCADE,
            name TEXT NOT NULL, passed INTEGER NOT NULL, PRIMARY KEY (result_id, name)) WITHOUT ROWID""",
        """CREATE TABLE versions (
            result_id INTEGER NOT NULL REFERENCES results(id) ON DELETE CASCADE,
            name TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (result_id, name)) WITHOUT ROWID""",
    ),
    (  # 2: the baseline is one GPU slot's (host + index + model), not the host's GPUs pooled
        "CREATE INDEX results_by_slot ON results(host, gpu_index, gpu_name, started_at)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_RESULT_COLUMNS = ("host", "gpu_index", "gpu_uuid", "gpu_name", "status", "verdict", "failed_step", "exit_code",
                   "duration_s", "started_at", "report", "note")


class HistoryError(UsageError):
    """The history file cannot be used (not SQLite, newer schema, no WAL): one line, exit 2, before any host."""


def default_path(report_dir: str | Path) -> Path:
    return Path(report_dir) / DEFAULT_NAME


def utc_iso(stamp: str) -> str:
    """An ISO 8601 time as `YYYY-MM-DDTHH:MM:SS.ffffffZ` in UTC, so that text order is time order."""
    if not stamp:
        return ""
    t = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    t = t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class HistoryStore:
    """One open history file. Use as a context manager; all methods are safe against concurrent writers."""

    def __init__(self, path: str | Path, migrations: Sequence[Sequence[str]] = MIGRATIONS):
        self.path = Path(path)
        self.migrations = tuple(migrations)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise HistoryError(f"{self.path}: SQLite could not use WAL mode here (journal_mode={mode}); put "
                                   "the history on a local filesystem")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise HistoryError(f"{self.path}: not a usable history database ({e})") from None
        except HistoryError:
            self.db.close()
            raise

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.db.close()

    @property
    def version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        if self.version > len(self.migrations):
            raise HistoryError(f"{self.path}: history schema v{self.version} is newer than this flashcore "
                               f"(v{len(self.migrations)}); use a newer flashcore or another history file")
        for target, statements in enumerate(self.migrations, start=1):
            if self.version >= target:
                continue
            with self._transaction():
                if self.version >= target:   # another process applied it while we waited for the lock
                    continue
                for sql in statements:
                    self.db.execute(sql)
                self.db.execute(f"PRAGMA user_version = {target}")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE: take the write lock up front (waiting up to the busy timeout), commit or roll back."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ------------------------------------------------------------------------------------------------ writing

    def record_run(self, results: Iterable[GpuResult], started_at: str, finished_at: str = "", target: str = "",
                   summary: str = "", exit_code: int | None = None) -> int:
        """Store one fleet run and its per-GPU results in one transaction; returns the run id."""
        with self._transaction():
            run_id = self.db.execute(
                "INSERT INTO runs (started_at, finished_at, target, summary, exit_code) VALUES (?, ?, ?, ?, ?)",
                (utc_iso(started_at), utc_iso(finished_at), target, summary, exit_code)).lastrowid
            for r in results:
                row = {c: getattr(r, c) for c in _RESULT_COLUMNS}
                row["started_at"] = utc_iso(r.started_at or started_at)
                rid = self.db.execute(
                    f"INSERT INTO results (run_id, {', '.join(_RESULT_COLUMNS)}) "
                    f"VALUES (?, {', '.join('?' * len(_RESULT_COLUMNS))})", (run_id, *row.values())).lastrowid
                self.db.executemany("INSERT INTO metrics VALUES (?, ?, ?)",
                                    [(rid, k, float(v)) for k, v in r.metrics.items()])
                self.db.executemany("INSERT INTO scenarios VALUES (?, ?, ?)",
                                    [(rid, k, int(v)) for k, v in r.scenarios.items()])
                self.db.executemany("INSERT INTO versions VALUES (?, ?, ?)",
                                    [(rid, k, str(v)) for k, v in r.versions.items()])
        return int(run_id)

    # ------------------------------------------------------------------------------------------------ reading

    def _load(self, where: str, params: Sequence, limit: int | None) -> list[GpuResult]:
        """Results matching `where`, oldest first (the newest `limit` of them)."""
        sql = (f"SELECT id, {', '.join(_RESULT_COLUMNS)} FROM results WHERE {where} "
               "ORDER BY started_at DESC, id DESC" + (f" LIMIT {int(limit)}" if limit else ""))
        rows = self.db.execute(sql, params).fetchall()[::-1]
        out = {row[0]: GpuResult(**dict(zip(_RESULT_COLUMNS, row[1:]))) for row in rows}
        if not out:
            return []
        marks = ", ".join("?" * len(out))
        for table, attr, conv in (("metrics", "metrics", float), ("scenarios", "scenarios", bool),
                                  ("versions", "versions", str)):
            for rid, name, value in self.db.execute(
                    f"SELECT result_id, name, {'passed' if table == 'scenarios' else 'value'} FROM {table} "
                    f"WHERE result_id IN ({marks})", tuple(out)):
                getattr(out[rid], attr)[name] = conv(value)
        return list(out.values())

    def earlier(self, cur: GpuResult, limit: int = 100) -> list[GpuResult]:
        """Results of the same GPU slot before `cur` (by start time), oldest first: the regression rule's input
        (`pipeline.regression.assess(cur, store.earlier(cur))`). A slot is the host, the GPU's index there and its
        model: the GPUs of one node never share a baseline (a bad card cannot hide behind its siblings), and a
        rented host that comes back with another card of the same model in that slot keeps its history (the UUID
        is recorded, and a changed one is named beside a flag as an environment change)."""
        return self._load("host = ? AND gpu_index IS ? AND gpu_name = ? AND started_at < ? AND status != 'not run'",
                          (cur.host, cur.gpu_index, cur.gpu_name, utc_iso(cur.started_at)), limit)

    def results(self, host: str | None = None, last: int | None = None) -> list[GpuResult]:
        """Every result that ran (of one host, when given), oldest first; the newest `last` of them."""
        where, params = "status != 'not run'", ()
        if host:
            where, params = where + " AND host = ?", (host,)
        return self._load(where, params, last)

    def hosts(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT host FROM results ORDER BY host")]

    def metric_names(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT name FROM metrics ORDER BY name")]
