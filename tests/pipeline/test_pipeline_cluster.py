"""A Slurm cluster in the inventory, up to where something would run (no Slurm needed): its entry checked by
slurm.SlurmConfig (exit 2 naming the file and field), the flags layered over it, the login node resolved like any
inventory host (or --local), --list-hosts and --dry-run, and the login node's steps. The runs themselves are in
tests/slurm/test_cluster_cli.py, against a real Slurm."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline import cli, cluster
from pipeline.settings import Flags

REPO = Path(__file__).resolve().parents[2]
ENTRY = {"executor": "slurm", "login": "login1", "workspace": "/shared/ws", "partition": "gpu", "account": "p42",
         "gpus": 4, "time": "00:20:00", "sbatch_options": ["--qos=normal"]}


@pytest.fixture
def inv(tmp_path) -> Path:
    key, known = tmp_path / "key", tmp_path / "known_hosts"
    key.write_text("not parsed before a connection\n")
    known.write_text("")
    doc = {"hosts": {"login1": {"address": "10.0.0.5", "port": 2222, "user": "alice", "identity": str(key),
                                "known_hosts": str(known), "python": "/opt/conda/bin/python"}},
           "clusters": {"lab": ENTRY}}
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def with_entry(inv: Path, **changes) -> Path:
    doc = yaml.safe_load(inv.read_text())
    doc["clusters"]["lab"] = {k: v for k, v in {**doc["clusters"]["lab"], **changes}.items() if v is not None}
    inv.write_text(yaml.safe_dump(doc))
    return inv


@pytest.mark.parametrize("changes, words", [
    ({"partition": "gpu h100"}, "clusters.lab.partition: must be one word"),
    ({"nodes": 3}, "clusters.lab.nodes: unknown key"),
    ({"time": "30 minutes"}, "clusters.lab.time: not a Slurm time limit"),
    ({"workspace": None}, "clusters.lab.workspace: Field required"),
    ({"executor": "kubernetes"}, "clusters.lab.executor: Input should be 'slurm'"),
    ({"gpus": 0}, "clusters.lab.gpus: Input should be greater than or equal to 1"),
    ({"sbatch_options": ["--array=0-9"]}, "clusters.lab.sbatch_options: --array is set by the pipeline itself"),
    ({"env": {"HF_TOKEN": "x"}}, "clusters.lab.env: HF_TOKEN looks like a secret"),
    ({"login": "login 1"}, "clusters.lab.login: must be one word"),
    ({"gpu": " "}, "clusters.lab.gpu: must be a GPU name (H100), any or none"),
    ({"model": "llama-9"}, "clusters.lab.model: unknown model 'llama-9'"),
])
def test_a_bad_cluster_entry_exits_2_naming_file_and_field(inv, changes, words, capsys):
    assert cli.main(["--inventory", str(with_entry(inv, **changes)), "--target", "lab", "--list-hosts"]) == 2
    err = capsys.readouterr().err
    assert f"{inv}: {words}" in err and err.count("\n") == 1 and "Traceback" not in err
    # the whole file is checked whatever the target, as for hosts
    assert cli.main(["--inventory", str(inv), "--target", "login1", "--list-hosts"]) == 2


@pytest.mark.parametrize("text, words", [
    ("hosts: {lab: {address: h}}\nclusters: {lab: {workspace: /w}}", "clusters.lab: a host or group has the same"),
    ("hosts: {a: {address: h}}\ngroups: {g: [a, lab]}\nclusters: {lab: {workspace: /w}}",
     "groups.g: 'lab' is a Slurm cluster, run on its own (--target lab)"),
    ("clusters: [lab]", "clusters: Input should be a valid dictionary"),
    ("defaults: {user: root}", "(top level): hosts: Field required (or clusters)"),
])
def test_cluster_names_and_shape(tmp_path, text, words, capsys):
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    assert cli.main(["--inventory", str(path), "--list-hosts"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"flashcore-deploy: error: {path}: ") and words in err


def test_a_cluster_alone_needs_no_hosts_and_runs_on_this_machine(tmp_path, capsys):
    path = tmp_path / "inv.yaml"
    path.write_text("clusters: {lab: {workspace: /w, gpu: none}}\ndefault_target: lab\n")
    assert cli.main(["--inventory", str(path), "--list-hosts"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("lab\tSlurm via this machine, no SSH\t1 CPU tasks (no GPU)") and "model tiny" in out


def test_list_hosts_shows_the_login_node_and_the_request(inv, capsys):
    assert cli.main(["--inventory", str(inv), "--target", "lab", "--list-hosts"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.split("\t")[:3] == ["lab", "Slurm via alice@10.0.0.5:2222", "partition gpu"]
    assert "4 GPUs (--gres=gpu:1), time 00:20:00, wall 3600 s" in line
    assert "model default\tpython /opt/conda/bin/python\tworkspace /shared/ws" in line


def test_flags_override_the_entry_and_local_makes_this_machine_the_login_node(inv):
    flags = cli.make_flags(inventory=str(inv), target="lab", local=True, workspace="/scratch/ws", timeout="90",
                           model="tiny", require_gpu="none", python="/usr/bin/python3")
    c = cluster.resolve(flags, REPO)
    assert (c.slurm.login, c.slurm.workspace, c.slurm.wall_s, c.slurm.suite_model, c.slurm.uses_gpu) == \
        (None, "/scratch/ws", 90.0, "tiny", False)
    assert (c.login.name, c.login.local, c.login.python, c.login.workspace, c.login.model) == \
        ("lab", True, "/usr/bin/python3", "/scratch/ws", "tiny")
    over_ssh = cluster.resolve(cli.make_flags(inventory=str(inv), target="lab", port="2200"), REPO)
    assert (over_ssh.login.address, over_ssh.login.port, over_ssh.login.user) == ("10.0.0.5", 2200, "alice")
    assert over_ssh.login.python == "/opt/conda/bin/python"      # the login host's own, the entry having none
    assert cluster.resolve(cli.make_flags(inventory=str(inv), target="login1"), REPO) is None   # a host: settings'
    assert cluster.resolve(Flags(host="h"), REPO) is None


def test_local_is_refused_for_a_target_that_is_not_a_cluster(inv, capsys):
    assert cli.main(["--inventory", str(inv), "--target", "login1", "--local", "--list-hosts"]) == 2
    assert "choose one of --host, --inventory/--target, --local" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--parallel", "4"), ("--gpus", "0,1"), ("--host-timeout", "60")])
def test_fleet_flags_are_refused_for_a_cluster_not_ignored(inv, capsys, flag, value):
    assert cli.main(["--inventory", str(inv), "--target", "lab", flag, value, "--list-hosts"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {flag}: " in err and "does not apply to the Slurm cluster lab" in err
    assert cli.main(["--inventory", str(inv), "--target", "login1", flag, value, "--list-hosts"]) == 0   # a host


def test_a_rerun_file_naming_the_cluster_selects_it_and_no_more(inv, tmp_path, capsys):
    rerun = tmp_path / "summary-x.rerun.txt"
    rerun.write_text("# the targets that did not pass in summary-x\nlab\n")
    assert cli.main(["--inventory", str(inv), "--target", f"@{rerun}", "--list-hosts"]) == 0
    assert capsys.readouterr().out.startswith("lab\tSlurm via alice@10.0.0.5:2222")
    rerun.write_text("lab\nlogin1\n")
    assert cli.main(["--inventory", str(inv), "--target", f"@{rerun}", "--list-hosts"]) == 2
    assert "the Slurm cluster lab is validated alone (one job array), not together with login1" in \
        capsys.readouterr().err


def test_the_history_is_the_flags_else_the_inventorys_as_for_hosts(inv):
    with_history = inv.with_name("with-history.yaml")
    with_history.write_text(inv.read_text() + "history: /var/lib/flashcore/h.sqlite\n")
    flags = cli.make_flags(inventory=str(with_history), target="lab")
    cluster.resolve(flags, REPO)
    assert cli.history_path(flags) == Path("/var/lib/flashcore/h.sqlite")
    flags = cli.make_flags(inventory=str(with_history), target="lab", history="/tmp/mine.sqlite")
    cluster.resolve(flags, REPO)
    assert cli.history_path(flags) == Path("/tmp/mine.sqlite")
    flags = cli.make_flags(inventory=str(inv), target="lab", report_dir="out")
    cluster.resolve(flags, REPO)
    assert cli.history_path(flags) == Path("out/history.sqlite")


def test_dry_run_prints_the_login_steps_and_the_sbatch_script(inv, capsys):
    assert cli.main(["--inventory", str(inv), "--target", "lab", "--local", "--dry-run", "--timeout", "99"]) == 0
    out = capsys.readouterr().out
    steps = [x.removeprefix("## ") for x in out.splitlines() if x.startswith("## ")]
    assert steps == ["connect", "lock", "sync", "install", "token", "suite"]       # no gpu step on the login node
    for words in ("#SBATCH --array=0-3", "#SBATCH --gres=gpu:1", "#SBATCH --partition=gpu", "#SBATCH --account=p42",
                  "#SBATCH --qos=normal", "wall limit 99 s", "sbatch --parsable --hold", "scancel <job id>",
                  "squeue --jobs=<job id> --array", "/shared/ws/.venv/bin/python -m pytest",
                  "--parity-model default"):
        assert words in out, words


def test_seed_reaches_every_task(inv, capsys):
    """--seed applies to a cluster as to SSH hosts (each task's suite gets --parity-seed), never silently dropped."""
    assert cli.main(["--inventory", str(inv), "--target", "lab", "--local", "--dry-run", "--seed", "7"]) == 0
    assert "--parity-seed 7" in capsys.readouterr().out
    assert cli.main(["--inventory", str(inv), "--target", "lab", "--local", "--dry-run"]) == 0
    assert "--parity-seed" not in capsys.readouterr().out


def test_fab_validate_and_nightly_take_a_cluster_target_as_the_cli_does(inv):
    import subprocess
    import sys

    fab = Path(sys.executable).parent / "fab"
    if not fab.exists():
        pytest.skip("fab (fabric) not installed in this environment")
    listed = subprocess.run([str(fab), "validate", "--inventory", str(inv), "--target", "lab", "--list-hosts"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "lab\tSlurm via alice@10.0.0.5:2222\tpartition gpu" in listed.stdout
    plan = subprocess.run([str(fab), "nightly", "--inventory", str(inv), "--target", "lab", "--dry-run"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "#SBATCH --array=0-3" in plan.stdout and "#SBATCH --gres=gpu:1" in plan.stdout


def test_the_shipped_inventory_has_a_valid_cluster_example():
    from pipeline.inventory import load_inventory

    entries = cluster.check_clusters(load_inventory(REPO / "inventory.yaml"), "inventory.yaml")
    assert entries["lab-slurm"].login == "lab-b" and entries["lab-slurm"].uses_gpu
