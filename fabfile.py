"""Fabric tasks for flashcore. `fab validate` runs exactly what `flashcore-deploy` runs (pipeline.cli.main).

    fab -H root@203.0.113.7:22022 -i ~/.ssh/runpod validate --python /opt/conda/bin/python
    fab validate                          # the default target of ./inventory.yaml
    fab validate --target nightly         # an inventory host, group, or all
    fab validate --local                  # this machine, no SSH

Run from the repository root (the code synced to the host is this checkout).
"""

from __future__ import annotations

from fabric import task
from invoke.exceptions import Exit

from pipeline.cli import main


@task(
    iterable=["skip"],
    help={
        "model": "tiny, llama-3.1-8b (default) or a hub id",
        "require_gpu": "H100 (default), any, or none (runs the suite on the CPU)",
        "python": "the host's interpreter (default python3)",
        "workspace": "remote workspace (default ~/flashcore-workspace)",
        "known_hosts": "known_hosts file for strict host-key checking",
        "accept_new_host_key": "record an unknown host key (a changed one is always refused)",
        "wheelhouse": "local wheels pushed for what the host lacks",
        "report_dir": "report folder (default reports/)",
        "skip": "skip a step: gpu, sync, install, token, suite (repeatable)",
        "timeout": "suite time limit in seconds",
        "inventory": "inventory file when no -H is given (default inventory.yaml)",
        "target": "inventory host, group or all",
        "local": "this machine, no SSH",
        "debug": "show tracebacks",
    },
)
def validate(c, model=None, require_gpu=None, python=None, workspace=None, known_hosts=None,
             accept_new_host_key=False, wheelhouse=None, report_dir="reports", skip=None, timeout=None,
             inventory="inventory.yaml", target=None, local=False, debug=False):
    """Validate a GPU host: connect, gpu, sync, install, token, parity suite, report."""
    argv: list[str] = []
    host = getattr(c, "host", None)  # a fabric Connection with -H; a plain invoke Context without
    if host:
        argv += ["--host", host, "--port", str(c.port), "--user", c.user]
        keys = (getattr(c, "connect_kwargs", None) or {}).get("key_filename")
        if keys:
            argv += ["--identity", keys if isinstance(keys, str) else keys[0]]
    elif local:
        argv.append("--local")
    else:
        argv += ["--inventory", inventory] + (["--target", target] if target else [])
    flags = {"--model": model, "--require-gpu": require_gpu, "--python": python, "--workspace": workspace,
             "--known-hosts": known_hosts, "--wheelhouse": wheelhouse, "--report-dir": report_dir,
             "--timeout": timeout}
    argv += [x for k, v in flags.items() if v is not None for x in (k, str(v))]
    argv += [x for step in skip or [] for x in ("--skip", step)]
    argv += ["--accept-new-host-key"] * bool(accept_new_host_key) + ["--debug"] * bool(debug)
    code = main(argv)
    if code:
        raise Exit(code=code)
