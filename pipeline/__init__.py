"""flashcore-deploy: the validation pipeline that runs the parity suite on a GPU host over SSH (or locally).

Read top to bottom as a run flows; each module imports only those below it:

    cli        flashcore-deploy: flags -> Flags, signals, the inventory's lock, the exit code   (fabfile.py: a sibling)
    fleet      many hosts at once: the bound, wall limits, live/plain output, then the summary's end
    cluster    a Slurm cluster: the login node through the runner, its suite step one job array (slurm), then
               one report per task and the fleet summary
    summary    the history's judgement, the summary files (history, regression, gpu_result below it)
    runner     one host: the steps in order (a GPU's suite each at once), cancellation, cleanup, verdict, report
    steps      each step: plan(facts) -> operations, conclude(facts, outputs) -> Outcome (both pure)
    report     one typed result -> Markdown + JSON, rendered once
    ssh        known_hosts, host-key policy, connect (ProxyJump), the exception map, SSHRemote
    remote     the command layer over invoke's runners: LocalRemote, cancellation, the process-group kill
    settings   defaults -> inventory -> ssh_config -> flags, resolved once, every input checked
    inventory  pydantic models of inventory.yaml      known_hosts  OpenSSH's known_hosts files, read
    local      facts about this machine (tree, revision, token)
    commands   pure shell-command builders            parse   pure parsers of remote output
    results    typed results                          errors  the exception tree, exit codes and verdicts
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
