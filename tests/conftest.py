"""Shared test setup.

Without CUDA the Triton kernels run in the interpreter (TRITON_INTERPRET=1, CPU tensors); it must be set
before triton is first imported, hence here at the top of the root conftest.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("flashcore parity suite")
    group.addoption("--parity-model", default=os.environ.get("FLASHCORE_PARITY_MODEL", "default"),
                    help="model(s) of the parity suite, comma-separated: presets (tiny, llama-3.1-8b), packaged "
                         "real models (smollm2-135m), hub ids, or 'default' (GPU: llama-3.1-8b,smollm2-135m; "
                         "CPU: tiny)")
    group.addoption("--parity-seed", type=int, default=int(os.environ.get("FLASHCORE_PARITY_SEED", "0")),
                    help="seed of the parity suite's random weights, prompts and targets (default 0)")
    group.addoption("--parity-scenarios", default=os.environ.get("FLASHCORE_PARITY_SCENARIOS", ""),
                    help="comma-separated subset of the parity scenarios (default: all registered)")
    group.addoption("--parity-json", default=os.environ.get("FLASHCORE_PARITY_JSON"),
                    help="write the parity results JSON document to this path")
    group.addoption("--parity-device", default=os.environ.get("FLASHCORE_PARITY_DEVICE"),
                    help="cuda or cpu (default: cuda when available)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"
