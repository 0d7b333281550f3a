"""The suite's latency section: eager, CUDA graph and CUDA graph with compiled blocks (issue 10's whole-model decode
step), flashcore and SDPA alike. Timing needs CUDA; on the CPU the section is skipped and the compiled mode's
wiring is checked on a real tiny model (only the timer is replaced: it would need a CUDA graph)."""

from __future__ import annotations

import pytest
import torch

from flashcore.models import load_model
from flashcore.parity import latency


def test_modes_report_the_plain_and_the_compiled_graphed_step():
    assert [mode for mode, _ in latency.MODES] == ["eager", "cuda_graph", "cuda_graph_compiled"]


def test_compiled_mode_times_the_graphed_step_inside_compiled_blocks(monkeypatch):
    model = load_model("tiny", device="cpu", dtype=torch.float32).model
    seen = {}

    def timer(m, prompt, steps):
        norms = [x for x in m.modules() if type(x).__name__.endswith("RMSNorm")]
        seen["patched"] = all("forward" in x.__dict__ for x in norms) and bool(norms)   # routed to compiled code
        seen["args"] = (m is model, prompt.shape, steps)
        return latency.Timing(1.5, "StaticCache(9), one captured decode step replayed 4x")

    monkeypatch.setattr(latency, "time_cuda_graph", timer)
    t = latency.time_cuda_graph_compiled(model, torch.zeros(1, 5, dtype=torch.long), 4)
    assert seen == {"patched": True, "args": (True, torch.Size([1, 5]), 4)}
    assert t.ms_per_token == 1.5 and "compiled" in t.note
    assert not any("forward" in x.__dict__ for x in model.modules())                   # restored afterwards


def test_cpu_skips_the_section_with_its_reason():
    model = load_model("tiny", device="cpu", dtype=torch.float32).model
    lat = latency.measure(model, "sdpa", cache_len=16, steps=2)
    assert lat.rows == [] and "interpreter" in lat.skipped_reason


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_measures_every_mode_for_flashcore_and_sdpa():
    from flashcore.integrations import register
    model = load_model("tiny", device="cuda").model
    lat = latency.measure(model, register(), cache_len=256, steps=8)
    assert [r.mode for r in lat.rows] == ["eager", "cuda_graph", "cuda_graph_compiled"]
    for row in lat.rows:
        assert row.flashcore_ms and row.sdpa_ms and row.flashcore_ms > 0 and row.sdpa_ms > 0, row
