"""`flashcore-deploy history`: the judged table and the PNG plot from a real history file, through the CLI's own
dispatch; bad input is one line and exit 2."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.gpu_result import GpuResult
from pipeline.history import HistoryStore
from pipeline.history_view import select_metrics, series_points, table_rows

GRAPHED = "llama-3.1-8b.decode.cuda_graph.flashcore_ms"


def _night(day: int, host: str, value: float, idx: int = 0) -> GpuResult:
    t = (datetime(2026, 12, 1, 2, 17, tzinfo=timezone.utc) + timedelta(days=day)).isoformat()
    return GpuResult(host, idx, f"GPU-{host}-{idx}", "NVIDIA H100 80GB HBM3", status="passed", verdict="PASSED",
                     started_at=t, versions={"torch": "2.11.0"},
                     metrics={GRAPHED: value, "llama-3.1-8b.err_bound.batch_4": 0.49,
                              "smollm2-135m.err_bound.batch_4": 0.41, "llama-3.1-8b.decode.eager.flashcore_ms": 40.0})


@pytest.fixture
def history(tmp_path):
    """Ten nights of two hosts; lab-a's graphed decode step 20% slower from night 7."""
    path = tmp_path / "reports" / "history.sqlite"
    with HistoryStore(path) as store:
        for day in range(10):
            rs = [_night(day, "lab-a", 8.66 * (1.2 if day >= 7 else 1.0)), _night(day, "lab-b", 8.70)]
            store.record_run(rs, started_at=rs[0].started_at, target="nightly")
    return path


def test_points_are_judged_as_the_nightly_judged_them(history):
    with HistoryStore(history) as store:
        points = series_points(store.results(), [GRAPHED], last=5)
    rows = table_rows(points)
    a = [r for r in rows if r[1] == "lab-a"]
    assert [r[0][:10] for r in a] == [f"2026-12-{d:02d}" for d in range(6, 11)]     # the last 5
    assert [r[-1] for r in a] == ["ok", "ok", "suspicious", "regression", "regression"]
    assert a[2][5:8] == ["10.39", "8.66", "+20.0%"]
    assert {r[-1] for r in rows if r[1] == "lab-b"} == {"ok"}


def test_unknown_metrics_are_listed():
    known = ["m.decode.x", "m.err_bound.a", "n.err_bound.b"]
    assert select_metrics("*.err_bound.*", known) == ["m.err_bound.a", "n.err_bound.b"]
    assert select_metrics("n.*", known) == ["n.err_bound.b"]
    with pytest.raises(Exception, match=r"--metric nope: no such metric in the history \(known: a, b\)"):
        select_metrics("nope", ["a", "b"])


def test_cli_prints_the_table_and_writes_the_plot(history, tmp_path, capsys):
    png = tmp_path / "trend.png"
    assert main(["history", "--history", str(history), "--host", "lab-a", "--last", "6", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "lab-a" in ln]
    assert len(lines) == 6 and "regression" in lines[-1] and "lab-b" not in out
    assert out.rstrip().endswith(f"plot: {png}")
    import matplotlib.image
    img = matplotlib.image.imread(png)
    assert img.shape[0] > 200 and img.shape[1] > 400
    rgb = img[..., :3]
    red = np.all(np.abs(rgb - np.array([0xD6, 0x27, 0x28]) / 255) < 0.08, axis=-1)     # tab:red, the regression x
    assert red.sum() > 20


def test_default_plot_goes_beside_the_history(history, capsys):
    assert main(["history", "--history", str(history), "--metric", "*.err_bound.*"]) == 0
    assert (history.parent / "history-err_bound.png").is_file()
    out = capsys.readouterr().out
    assert "llama-3.1-8b.err_bound.batch_4" in out and "smollm2-135m.err_bound.batch_4" in out


@pytest.mark.parametrize("argv, message", [
    (["--history", "{h}", "--host", "lab-z"], "--host lab-z: not in the history (hosts: lab-a, lab-b)"),
    (["--history", "{h}", "--metric", "power"], "--metric power: no such metric in the history"),
    (["--history", "{h}", "--last", "0"], "--last must be at least 1"),
    (["--history", "{missing}"], "no history at"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_input_is_one_line_and_exit_2(history, tmp_path, capsys, argv, message):
    argv = [a.format(h=history, missing=tmp_path / "none.sqlite") for a in argv]
    assert main(["history", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flashcore-deploy: error: ") and message in err
