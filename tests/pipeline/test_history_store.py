"""The SQLite history store on real files: WAL mode, schema version and migrations (applied once, atomically, a
newer file refused), round trip of per-GPU records, the regression rule's query, bad files, concurrent writers."""

from __future__ import annotations

import multiprocessing
import sqlite3

import pytest

from pipeline.gpu_result import GpuResult
from pipeline.history import MIGRATIONS, SCHEMA_VERSION, HistoryError, HistoryStore, default_path, utc_iso


def _rec(host="lab-a", idx=0, t="2026-11-01T02:17:00+00:00", value=8.7, status="passed", name="H100", **kw):
    return GpuResult(host=host, gpu_index=idx, gpu_uuid=f"GPU-{host}-{idx}", gpu_name=name, status=status,
                     verdict=status.upper(), started_at=t, duration_s=120.5, report=f"reports/{host}.md",
                     metrics={"decode.cuda_graph.flashcore_ms": value, "err_bound.batch_4": 0.49},
                     scenarios={"batch_4": status == "passed", "single_token": True},
                     versions={"torch": "2.11.0", "code": "abc"}, **kw)


def test_new_file_is_wal_with_the_current_schema(tmp_path):
    path = default_path(tmp_path / "reports")
    with HistoryStore(path) as store:
        assert store.version == SCHEMA_VERSION == len(MIGRATIONS)
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"runs", "results", "metrics", "scenarios", "versions"} <= tables
    assert path == tmp_path / "reports" / "history.sqlite" and path.is_file()


def test_round_trip_and_the_rule_query(tmp_path):
    with HistoryStore(tmp_path / "h.sqlite") as store:
        for day in range(1, 6):
            t = f"2026-11-0{day}T02:17:00+00:00"
            store.record_run([_rec(t=t, value=8.7 + day / 100), _rec(idx=1, t=t),
                              _rec(idx=2, t=t, status="not run"), _rec(host="lab-b", t=t),
                              _rec(t=t, idx=3, name="A100")], started_at=t, target="nightly", exit_code=0)
        cur = _rec(t="2026-11-04T02:17:00Z", value=9.9)
        past = store.earlier(cur)
        assert [p.started_at[:10] for p in past] == ["2026-11-01", "2026-11-02", "2026-11-03"]
        # the same slot only: host + GPU index + model (GPU 1 of lab-a, lab-b's GPU 0, the A100 are others)
        assert {(p.host, p.gpu_index, p.gpu_name) for p in past} == {("lab-a", 0, "H100")}
        assert all(p.status != "not run" for p in past)
        assert [p.gpu_index for p in store.earlier(_rec(idx=1, t="2026-11-04T02:17:00Z"))] == [1, 1, 1]
        swapped = _rec(t="2026-11-04T02:17:00Z")
        swapped.gpu_uuid = "GPU-another-card"               # a rented host's card swapped in that slot: same history
        assert len(store.earlier(swapped)) == 3
        cpu = _rec(idx=None, name="cpu", t="2026-11-09T02:17:00Z")
        store.record_run([_rec(idx=None, name="cpu", t="2026-11-08T02:17:00Z")], started_at="2026-11-08T02:17:00Z")
        assert [p.gpu_index for p in store.earlier(cpu)] == [None]        # NULL index matched (IS, not =)
        assert len(store.earlier(cur, limit=2)) == 2 and store.earlier(cur, limit=2)[-1].started_at[:10] == "2026-11-03"
        first = past[0]
        want = _rec(t="2026-11-01T02:17:00+00:00", value=8.7 + 1 / 100)
        want.started_at = utc_iso(want.started_at)
        assert first == want
        assert store.hosts() == ["lab-a", "lab-b"]
        assert store.metric_names() == ["decode.cuda_graph.flashcore_ms", "err_bound.batch_4"]
        assert len(store.results(host="lab-b")) == 5 and len(store.results(last=4)) == 4
        assert store.db.execute("SELECT count(*) FROM runs").fetchone()[0] == 6


def test_utc_iso_orders_mixed_offsets():
    stamps = ["2026-11-25T13:17:41.106320+00:00", "2026-11-25T14:00:00+02:00", "2026-11-25T12:00:00Z"]
    assert sorted(map(utc_iso, stamps)) == ["2026-11-25T12:00:00.000000Z", "2026-11-25T12:00:00.000000Z",
                                            "2026-11-25T13:17:41.106320Z"]
    assert utc_iso("") == ""


def test_a_later_migration_keeps_the_data(tmp_path):
    path = tmp_path / "h.sqlite"
    with HistoryStore(path) as store:
        store.record_run([_rec()], started_at="2026-11-01T00:00:00Z")
    extra = (*MIGRATIONS, ("ALTER TABLE results ADD COLUMN power_w REAL", "CREATE INDEX by_power ON results(power_w)"))
    with HistoryStore(path, migrations=extra) as store:
        assert store.version == SCHEMA_VERSION + 1
        assert store.db.execute("SELECT host, power_w FROM results").fetchall() == [("lab-a", None)]
    with pytest.raises(HistoryError, match=rf"schema v{SCHEMA_VERSION + 1} is newer than this flashcore "
                                           rf"\(v{SCHEMA_VERSION}\)"):
        HistoryStore(path)


def test_a_failing_migration_is_rolled_back(tmp_path):
    path = tmp_path / "h.sqlite"
    HistoryStore(path).close()
    broken = (*MIGRATIONS, ("CREATE TABLE half_done (x)", "THIS IS NOT SQL"))
    with pytest.raises(HistoryError, match="not a usable history database"):
        HistoryStore(path, migrations=broken)
    with HistoryStore(path) as store:
        assert store.version == SCHEMA_VERSION
        assert not store.db.execute("SELECT name FROM sqlite_master WHERE name = 'half_done'").fetchall()


def test_not_a_database(tmp_path):
    bad = tmp_path / "reports.md"
    bad.write_text("# a report, not a database\n" * 100)
    with pytest.raises(HistoryError, match=r"reports\.md: not a usable history database"):
        HistoryStore(bad)


def test_two_processes_opening_a_new_file_apply_the_schema_once(tmp_path):
    path = tmp_path / "h.sqlite"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        versions = pool.map(_open_version, [str(path)] * 8)
    assert versions == [SCHEMA_VERSION] * 8


def _open_version(path: str) -> int:
    with HistoryStore(path) as store:
        return store.version


def _writer(args: tuple[str, str, int]) -> int:
    path, host, n = args
    with HistoryStore(path) as store:
        for i in range(n):
            t = f"2026-11-01T02:{i // 60:02d}:{i % 60:02d}Z"
            store.record_run([_rec(host=host, t=t, value=8.0 + i)], started_at=t)
    return n


def test_concurrent_writers_and_a_reader(tmp_path):
    """Two nightly processes writing the same file at once (each run in one transaction) and a reader between
    them: nothing lost, no 'database is locked'."""
    path = str(tmp_path / "h.sqlite")
    HistoryStore(path).close()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        pending = pool.map_async(_writer, [(path, "lab-a", 40), (path, "lab-b", 40), (path, "lab-c", 40)])
        with HistoryStore(path) as reader:
            while not pending.ready():
                counts = reader.db.execute("SELECT count(*) FROM results").fetchone()[0]
                assert counts <= 120
        assert pending.get(timeout=120) == [40, 40, 40]
    with HistoryStore(path) as store:
        assert store.db.execute("SELECT count(*) FROM runs").fetchone()[0] == 120
        assert store.db.execute("SELECT count(*) FROM metrics").fetchone()[0] == 240
        assert [r.metrics["decode.cuda_graph.flashcore_ms"] for r in store.results(host="lab-b")] == \
            [8.0 + i for i in range(40)]
        assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    sqlite3.connect(path).close()
