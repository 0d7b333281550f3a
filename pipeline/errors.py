"""The pipeline's exceptions, each with the exit code and the verdict the runner and the CLI turn it into.

    PipelineError                    5  ERROR: <step> step failed   (base: something went wrong in a step)
    ├── UsageError                   2  (no run: bad flag, preset, file; raised before anything runs)
    │   └── InventoryError           2  bad inventory file: names the file, the line or field and why
    ├── ConnectError                 3  UNREACHABLE                  (base of the connection failures)
    │   ├── UnreachableError         3  UNREACHABLE                  refused, timed out, no route, dropped mid-run
    │   ├── AuthenticationError      3  REFUSED: authentication      the key was not accepted
    │   └── HostKeyError             3  REFUSED: host key            unknown (strict), changed or revoked host key
    ├── GpuRequirementError          4  GPU REQUIREMENT NOT MET      no nvidia-smi, wrong GPU, too few, too little memory
    ├── StepError                    5  ERROR: <step> step failed    sync, install, token, suite crash, model not loadable
    │   └── CommandTimeout           5  ERROR: <step> step failed    a remote command ran past its deadline (and was killed)
    │       └── WallTimeout          5  TIMED OUT                    the host's whole run passed its wall limit (a fleet)
    ├── BusyError                    6  BUSY                         another run holds the workspace lock (--lock-timeout)
    │                                                                    or this inventory's local fleet lock
    ├── UnknownError                 5  UNKNOWN                      an unexpected exception (a bug), or a fleet host whose
    │                                                                    run never ended: its state is not known
    ├── ParityFailure                1  FAILED: parity               the kernels disagree with the reference: nothing else
    └── Interrupted           128 + N  INTERRUPTED                  SIGINT (130), SIGTERM (143), SIGHUP (129)

The CLI prints `str(error)` as one line on stderr and exits with `error.exit_code`; `--debug` adds the
traceback. Messages never contain secrets (the HF token is never put into any string that could end up here).
"""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_PARITY = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3
EXIT_GPU = 4
EXIT_STEP = 5
EXIT_BUSY = 6
EXIT_SIGINT = 128 + signal.SIGINT      # 130
EXIT_SIGTERM = 128 + signal.SIGTERM    # 143


class PipelineError(Exception):
    exit_code = EXIT_STEP
    verdict = ""                       # "" -> "ERROR: <step> step failed"


class UsageError(PipelineError):
    exit_code = EXIT_USAGE


class InventoryError(UsageError):
    pass


class ConnectError(PipelineError):
    exit_code = EXIT_CONNECT
    verdict = "UNREACHABLE"


class UnreachableError(ConnectError):
    """`transient`: a failure worth another try (refused, reset, timed out), never an auth or host-key one."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class AuthenticationError(ConnectError):
    verdict = "REFUSED: authentication"


class HostKeyError(ConnectError):
    verdict = "REFUSED: host key"


class GpuRequirementError(PipelineError):
    exit_code = EXIT_GPU
    verdict = "GPU REQUIREMENT NOT MET"


class StepError(PipelineError):
    exit_code = EXIT_STEP


class CommandTimeout(StepError):
    pass


class WallTimeout(CommandTimeout):
    """A fleet host's run passed its wall limit: it was stopped (and cleaned up) so the fleet can finish."""

    verdict = "TIMED OUT"


class BusyError(PipelineError):
    exit_code = EXIT_BUSY
    verdict = "BUSY"


class UnknownError(PipelineError):
    verdict = "UNKNOWN"


class ParityFailure(PipelineError):
    exit_code = EXIT_PARITY
    verdict = "FAILED: parity"


class Interrupted(PipelineError):
    verdict = "INTERRUPTED"

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def verdict_for(error: PipelineError | None, failed_step: str, suite_skipped: bool) -> tuple[str, int]:
    """(verdict, exit code) of one host's run."""
    if error is None:
        return ("PASSED (suite skipped)" if suite_skipped else "PASSED"), EXIT_OK
    return (error.verdict or f"ERROR: {failed_step} step failed"), error.exit_code


def overall_exit_code(codes: list[int]) -> int:
    """Several hosts: an interruption wins, else the highest code."""
    interrupted = [c for c in codes if c > 128]
    return interrupted[0] if interrupted else max(codes, default=EXIT_OK)
