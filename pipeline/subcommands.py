"""flashcore-deploy's subcommands; any other command line is a validation run (pipeline.cli).

    flashcore-deploy history [--host H] [--metric M] [--last N]     pipeline/history_view.py
    flashcore-deploy schedule --emit cron|systemd|github            pipeline/schedule.py
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

SUBCOMMANDS = {"history": "pipeline.history_view", "schedule": "pipeline.schedule"}


def dispatch(argv: Sequence[str]) -> int | None:
    """The subcommand's exit code, or None when `argv` names none. Bad input raises UsageError (exit 2)."""
    if not argv or argv[0] not in SUBCOMMANDS:
        return None
    return importlib.import_module(SUBCOMMANDS[argv[0]]).main(list(argv[1:]))
