"""The login node over SSH, as a real run reaches it: pipeline.slurm through the SSH backend (a real OpenSSH sshd on
loopback, tests/integration/harness.py) in front of the real single-node Slurm. Everything crosses SSH: the
script in a heredoc, sbatch, each squeue, the collection, the results' tarball (SFTP)."""

from __future__ import annotations

import os

from pipeline import slurm
from pipeline.remote import Cancel
from pipeline.settings import HostConfig
from pipeline.ssh import open_remote


def test_array_through_the_login_node_over_ssh(idle, login_sshd, workspace, tmp_path):
    login = login_sshd
    before = login.commands.stat().st_size if login.commands.exists() else 0   # the sshd serves other tests too
    cfg = slurm.SlurmConfig(workspace=str(workspace), login="127.0.0.1", gpus=2, gpu="none", time="5",
                            env=idle.env, poll_min_s=0.3, poll_max_s=1.0)
    host = HostConfig(name="login", address="127.0.0.1", port=login.port, user=os.environ.get("USER") or "root",
                      identities=(str(login.client_key),), known_hosts=(str(login.known_hosts),),
                      known_hosts_given=True)
    remote = open_remote(host, Cancel())
    try:
        cmd = 'echo "{}" > "$task_dir/parity.json"; [ "$SLURM_ARRAY_TASK_ID" = 0 ]'
        run = slurm.run_array(remote, cfg, slurm.render_script(cfg, suite_command=cmd))
        local = slurm.fetch_results(remote, run, tmp_path)
    finally:
        remote.close()
    assert [(r.state, r.exit_code) for r in run.records] == [("COMPLETED", 0), ("FAILED", 1)]
    assert (local / "0" / "parity.json").read_text() == "{}\n" and (local / "validate.sbatch").is_file()
    sent = login.commands.read_text()[before:]
    assert sent.count('sbatch --parsable --hold "$f"') == 1 and sent.count(" squeue --jobs=") == run.polls
