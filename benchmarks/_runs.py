"""What the parity benchmark scripts share: the device choice (interpreter on the CPU) and resumable JSON lines."""

from __future__ import annotations

import json
import os
from pathlib import Path


def device_kind(device: str | None) -> str:
    """'cuda' or 'cpu' for a --device flag; on the CPU the kernels run in the Triton interpreter, which must be
    chosen before triton is imported."""
    import torch
    kind = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return kind


class JsonLines:
    """Rows already in `path` (a rerun resumes) and append(row), written at once (an interruption loses none)."""

    def __init__(self, path):
        self.path = Path(path)
        self.rows = ([json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
                     if self.path.exists() else [])

    def append(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)
