"""The pipeline's exceptions, each with the process exit code the CLI turns it into.

    PipelineError                    5  (base: something went wrong in a step)
    ├── UsageError                   2  bad command line
    │   └── InventoryError           2  bad inventory file: names the file, the field and why
    ├── ConnectError                 3  (base of the connection failures)
    │   ├── UnreachableError         3  refused, timed out, no route, dropped mid-run
    │   ├── AuthenticationError      3  the key was not accepted
    │   └── HostKeyError             3  unknown host key (strict) or a changed one (always)
    ├── GpuRequirementError          4  no nvidia-smi, wrong GPU, too few, too little memory
    ├── StepError                    5  a step failed: sync, install, token, suite crash
    │   └── CommandTimeout           5  a remote command ran past its deadline (and was killed)
    ├── ParityFailure                1  the suite ran and its verdict is "failed"
    └── Interrupted                130  Ctrl-C

The CLI prints `str(error)` as one line on stderr and exits with `error.exit_code`; `--debug` adds the
traceback. Messages never contain secrets (the HF token is never put into any string that could end up here).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_PARITY = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3
EXIT_GPU = 4
EXIT_STEP = 5
EXIT_INTERRUPTED = 130


class PipelineError(Exception):
    exit_code = EXIT_STEP


class UsageError(PipelineError):
    exit_code = EXIT_USAGE


class InventoryError(UsageError):
    pass


class ConnectError(PipelineError):
    exit_code = EXIT_CONNECT


class UnreachableError(ConnectError):
    pass


class AuthenticationError(ConnectError):
    pass


class HostKeyError(ConnectError):
    pass


class GpuRequirementError(PipelineError):
    exit_code = EXIT_GPU


class StepError(PipelineError):
    exit_code = EXIT_STEP


class CommandTimeout(StepError):
    pass


class ParityFailure(PipelineError):
    exit_code = EXIT_PARITY


class Interrupted(PipelineError):
    exit_code = EXIT_INTERRUPTED
