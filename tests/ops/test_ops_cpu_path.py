"""CPU tensors run in triton's interpreter only, and only where it works: otherwise one clear ValueError (and
`python -m flashcore.parity --device cpu` exits 2 with it) instead of a triton error from inside a kernel, which
the parity suite would count as every scenario failing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashcore.ops import _common, decode_attention, prefill_attention


class _OneElement:
    """np.zeros(1) as a NumPy that refuses (NumPy 2.x: TypeError) or accepts int() of a one-element array."""

    def __init__(self, refuses: bool):
        self.refuses = refuses

    def __int__(self) -> int:
        if self.refuses:
            raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
        return 0


@pytest.mark.parametrize("refuses", [True, False], ids=["numpy-refuses", "numpy-accepts"])
def test_interpreter_problem_names_triton_before_3_7_with_a_numpy_that_refuses(refuses, monkeypatch):
    monkeypatch.setattr(np, "zeros", lambda *a, **k: _OneElement(refuses))
    assert _common.interpreter_problem("3.7.0") is None and _common.interpreter_problem("3.9.1+git") is None
    problem = _common.interpreter_problem("3.6.0")
    assert (problem is not None) == refuses
    if refuses:
        assert "triton 3.6.0" in problem and f"NumPy {np.__version__}" in problem and ">= 3.7" in problem


def test_cpu_problem_asks_for_the_interpreter_then_for_one_that_works(monkeypatch):
    assert _common.CPU_PROBLEM == _common.cpu_problem()     # decided at import, as check_qkv reads it
    monkeypatch.setattr(_common, "INTERPRET", False)
    assert "TRITON_INTERPRET=1 before triton is imported" in _common.cpu_problem()
    monkeypatch.setattr(_common, "INTERPRET", True)
    assert _common.cpu_problem() == _common.interpreter_problem()


@pytest.mark.parametrize("call", [
    lambda q: prefill_attention(q, q, q),
    lambda q: decode_attention(q[:, :, :1], q, q, torch.tensor([3])),
], ids=["prefill", "decode"])
def test_cpu_tensors_where_they_cannot_run_are_one_clear_value_error(call, monkeypatch):
    monkeypatch.setattr(_common, "CPU_PROBLEM", "CPU tensors run in triton's interpreter only: set TRITON_INTERPRET=1")
    with pytest.raises(ValueError, match="set TRITON_INTERPRET=1"):
        call(torch.zeros(1, 4, 3, 64))
