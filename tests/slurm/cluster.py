"""A real single-node Slurm for the tests and benchmarks/bench_slurm_scale.py: munged, slurmctld and slurmd from the
distribution's packages (scripts/bootstrap.sh installs them), each started in the foreground by us with a
configuration of its own under one folder: its own munge key and socket, free loopback ports, StateSaveLocation
and spool, no cgroups (proctrack/linuxproc + task/none: Debian 12's slurm 22.05 refuses CgroupPlugin=disabled),
no accounting database. Two partitions: `debug` (default) and `closed` (State=DOWN: jobs there pend with
Slurm's reason PartitionDown). Fake GPUs: a gpu GRES whose File= lines are character devices made with mknod
(Slurm requires devices; with task/none nothing opens them), so --gres=gpu:1 and CUDA_VISIBLE_DEVICES are Slurm's
own; there is no nvidia-smi, so no GPU UUID. `stop()` cancels every job, ends the daemons and any process of
this cluster's jobs, by pid, and leaves nothing running."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.harness import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo")


def _which(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if Path(p).exists()),
                                      None)


def missing() -> str:
    """Why a cluster cannot start here ('' when it can)."""
    absent = [n for n in (*DAEMONS, *CLIENTS) if not _which(n)]
    if absent:
        return (f"Slurm/munge not installed ({', '.join(absent)} missing; scripts/bootstrap.sh installs slurmctld "
                "slurmd slurm-client munge as root)")
    if os.geteuid() != 0:
        return "the single-node Slurm fixture runs its daemons as root (SlurmUser=root)"
    return ""


@dataclass
class Cluster:
    dir: Path
    node: str
    cpus: int
    gpus: int
    env: dict[str, str]                          # SLURM_CONF: what every client command needs
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=timeout, check=check)

    def node_state(self) -> str:
        out = self.run("sinfo", "--noheader", "--Node", f"--nodes={self.node}", "--format=%T").stdout
        return (out.split() or ["?"])[0]

    def wait_node(self, state: str = "idle", timeout: float = 30) -> None:
        t0 = time.monotonic()
        while self.node_state() != state:
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"node {self.node} not {state} after {timeout:g} s: {self.node_state()}\n"
                                   + self.logs())
            time.sleep(0.3)

    def active_jobs(self) -> list[str]:
        out = self.run("squeue", "--noheader", "--array", "--states=PENDING,RUNNING,COMPLETING,SUSPENDED,CONFIGURING",
                       "--format=%i %T", check=False).stdout
        return out.split("\n") if out.strip() else []

    def leftovers(self) -> list[int]:
        """Processes of THIS cluster's jobs (slurmstepd, job scripts and their children: their environment names
        our slurm.conf), not counting the daemons we started."""
        mine = f"SLURM_CONF={self.env['SLURM_CONF']}".encode()
        ours = {p.pid for p in self.procs.values()} | {os.getpid()}
        pids = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and int(proc.name) not in ours and \
                        mine in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
        return pids

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:]
                         for p in sorted((self.dir / "log").glob("*")))

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", f"--user={os.getuid()}", check=False)
            t0 = time.monotonic()
            while self.active_jobs() and time.monotonic() - t0 < 30:
                time.sleep(0.5)
        for name in reversed(list(self.procs)):
            _terminate(self.procs[name])
        # a job's processes outliving it (its slurmd killed, say): ours, so ended by pid
        for pid in self.leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _fake_gpus(d: Path, count: int) -> list[str]:
    """`count` character devices (the major/minor of /dev/null) for the gpu GRES; [] where mknod is refused."""
    paths = []
    for i in range(count):
        p = d / f"gpu{i}"
        try:
            os.mknod(p, 0o666 | 0o020000, os.makedev(1, 3))
        except OSError:
            return []
        paths.append(str(p))
    return paths


def slurm_conf(d: Path, node: str, cpus: int, gpus: int, ctld_port: int, slurmd_port: int,
               max_array_size: int, extra: str = "") -> str:
    gres = f" Gres=gpu:{gpus}" if gpus else ""
    return f"""\
ClusterName=flashcore-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
# no cgroups: these two need none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
# the node may be declared with other CPU counts than the machine has (the scale benchmark declares more)
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=600
MaxArraySize={max_array_size}
MaxJobCount=20000
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=2000{gres} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
PartitionName=closed Nodes={node} MaxTime=INFINITE State=DOWN
{extra.format(node=node)}"""


def start_cluster(d: Path, cpus: int | None = None, gpus: int = 2, max_array_size: int = 1001,
                  extra: str = "") -> Cluster:
    """Start munged, slurmctld, slurmd in `d`; returns when the node is idle. `extra`: more slurm.conf lines
    ({node} is the node's name). Raises RuntimeError (with the daemons' logs) when it does not come up; whatever
    started is stopped first."""
    for sub in ("munge", "state", "spool", "log", "dev"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "munge").chmod(0o700)
    key = d / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    node = socket.gethostname().split(".")[0]
    devices = _fake_gpus(d / "dev", gpus)
    conf = d / "slurm.conf"
    conf.write_text(slurm_conf(d, node, cpus or os.cpu_count() or 1, len(devices), free_port(), free_port(),
                               max_array_size, extra))
    (d / "gres.conf").write_text("".join(f"NodeName={node} Name=gpu File={p}\n" for p in devices))
    cluster = Cluster(d, node, cpus or os.cpu_count() or 1, len(devices), {"SLURM_CONF": str(conf)})
    env = {**os.environ, **cluster.env}
    try:
        sock = d / "munge" / "munge.socket"
        cluster.procs["munged"] = _spawn(d, "munged", [
            _which("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
            f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/log/munged.log", f"--seed-file={d}/munge/seed"], env)
        _wait(lambda: sock.exists(), 10, "munged socket", cluster)
        cluster.procs["slurmctld"] = _spawn(d, "slurmctld", [_which("slurmctld"), "-D", "-c"], env)
        _wait(lambda: "UP" in cluster.run("scontrol", "ping", check=False).stdout, 30, "slurmctld", cluster)
        cluster.procs["slurmd"] = _spawn(d, "slurmd", [_which("slurmd"), "-D", "-N", node], env)
        cluster.wait_node("idle", 30)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _spawn(d: Path, name: str, argv: list, env: dict) -> subprocess.Popen:
    with open(d / "log" / f"{name}.out", "ab") as out:
        return subprocess.Popen([str(a) for a in argv], stdout=out, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _wait(ok, timeout: float, what: str, cluster: Cluster) -> None:
    t0 = time.monotonic()
    while not ok():
        dead = [n for n, p in cluster.procs.items() if p.poll() is not None]
        if dead or time.monotonic() - t0 > timeout:
            why = f"{', '.join(dead)} exited" if dead else f"not up after {timeout:g} s"
            raise RuntimeError(f"{what}: {why}\n{cluster.logs()}")
        time.sleep(0.2)
