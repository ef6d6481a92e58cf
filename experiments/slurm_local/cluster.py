"""A real SLURM cluster on one machine: one ``slurmd`` per emulated node of ``experiments/netem``.

Every node is a network namespace of :class:`experiments.netem.Cluster` (its own address
10.231.0.<i+1>, links shaped with ``tc``); ``slurmd -N node<i>`` runs inside it, ``slurmctld`` inside
node 0's, and one ``munged`` (on a private socket) serves them all. ``node<i>`` resolves through
lines added to ``/etc/hosts`` (removed again at exit). Client commands (``sbatch``, ``srun``,
``squeue``, ``scancel``) run in node 0's namespace through :meth:`SlurmCluster.run`::

    with SlurmCluster(nodes=2, cpus=2, rate="1gbit") as sc:
        print(sc.run(["srun", "-N", "2", "-n", "4", "hostname"]).stdout)

Needs root, iproute2 and Debian's ``slurmd slurmctld slurm-client munge`` packages; raises
:class:`SlurmUnavailable` saying what is missing. Daemons are stopped by their own pids at exit.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Mapping, Optional, Sequence

from experiments.netem import Cluster

HOSTS = "/etc/hosts"
BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "sinfo", "squeue", "scancel")


class SlurmUnavailable(RuntimeError):
    """SLURM (or root, or the emulated network) is not available here; the message says why."""


def check_support() -> None:
    if os.geteuid() != 0:
        raise SlurmUnavailable("needs root (network namespaces, daemons, /etc/hosts)")
    missing = [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]
    if missing:
        raise SlurmUnavailable(f"missing {', '.join(missing)}: apt-get install slurmd slurmctld slurm-client munge")


def _which(b: str) -> str:
    return shutil.which(b) or f"/usr/sbin/{b}"


class SlurmCluster:
    """``nodes`` SLURM nodes of ``cpus`` CPUs each on the emulated network (see the module docstring)."""

    def __init__(self, nodes: int = 2, cpus: int = 2, rate: Optional[str] = "1gbit", workdir: Optional[str] = None,
                 tag: str = "cmt") -> None:
        check_support()
        self.nodes, self.cpus, self.rate = nodes, cpus, rate
        self.dir = workdir or tempfile.mkdtemp(prefix="commopt-slurm-")
        self.tag = f"{tag}{os.getpid()}"
        self.names = [f"{self.tag}n{i}" for i in range(nodes)]
        self.net = Cluster(nodes=nodes, ranks_per_node=1, rate=rate)
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.sock = os.path.join(self.dir, "munge.sock")
        self._procs: list[subprocess.Popen] = []
        self._slurmd: dict[int, subprocess.Popen] = {}
        self._pids: list[str] = []
        self._hosts_added = False

    # -- lifecycle ------------------------------------------------------------------------------------
    def __enter__(self) -> "SlurmCluster":
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def addr(self, i: int) -> str:
        return self.net.ips[i]

    def up(self) -> None:
        self.net.up()
        os.makedirs(os.path.join(self.dir, "state"), exist_ok=True)
        self._add_hosts()
        self._start_munge()
        self._write_conf()
        env = self.env()
        # each daemon in its node's namespace and its own UTS namespace, under the node's host name (slurmctld
        # checks that it runs on SlurmctldHost; a job's `hostname` is then its node's)
        self._spawn(0, [_which("slurmctld"), "-D", "-f", self.conf], "slurmctld.out", env, host=self.names[0] + "c")
        for i in range(self.nodes):
            self.start_slurmd(i)
        self.wait_idle()

    def start_slurmd(self, i: int) -> None:
        """(Re)start node ``i``'s slurmd, in the node's namespaces and under its host name."""
        name = self.names[i]
        os.makedirs(os.path.join(self.dir, "spool", name), exist_ok=True)
        self._slurmd[i] = self._spawn(i, [_which("slurmd"), "-D", "-f", self.conf, "-N", name],
                                      f"slurmd.{name}.out", self.env(), host=name)

    def stop_slurmd(self, i: int, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Stop node ``i``'s slurmd by its own pid (as ``systemctl stop slurmd`` would), its job steps left
        running; returns the pid."""
        p = self._slurmd[i]
        p.send_signal(sig)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        return p.pid

    def down(self) -> None:
        for p in reversed(self._procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 10
        for p in self._procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._procs.clear()
        for pidfile in self._pids:  # munged daemonises: stop it by its pid file
            try:
                os.kill(int(open(pidfile).read().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        self._pids.clear()
        self._remove_hosts()
        self.net.down()

    # -- pieces ----------------------------------------------------------------------------------------
    def env(self, extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
        env = dict(os.environ, SLURM_CONF=self.conf)
        for k in [k for k in env if k.startswith(("SLURM_", "PMI_", "OMPI_")) and k != "SLURM_CONF"]:
            del env[k]
        env.update(extra or {})
        return env

    def _spawn(self, node: int, argv: Sequence[str], log: str, env: Mapping[str, str], host: str) -> subprocess.Popen:
        out = open(os.path.join(self.dir, log), "a")
        inner = 'hostname "$0" && exec "$@"'  # ip netns exec, unshare and sh all exec: the pid is the daemon's
        p = subprocess.Popen(
            ["ip", "netns", "exec", self.net.netns[node], "unshare", "--uts", "--", "sh", "-c", inner, host, *argv],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._procs.append(p)
        return p

    def _start_munge(self) -> None:
        key = os.path.join(self.dir, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        pid = os.path.join(self.dir, "munged.pid")
        subprocess.run([_which("munged"), "--force", f"--socket={self.sock}", f"--key-file={key}",
                        f"--pid-file={pid}", f"--log-file={os.path.join(self.dir, 'munged.log')}",
                        f"--seed-file={os.path.join(self.dir, 'munged.seed')}"], check=True)
        self._pids.append(pid)

    def _write_conf(self) -> None:
        d = self.dir
        nodes = "\n".join(f"NodeName={n} NodeAddr={self.addr(i)} CPUs={self.cpus} State=UNKNOWN"
                          for i, n in enumerate(self.names))
        text = f"""ClusterName=commoptlocal
SlurmctldHost={self.names[0]}c({self.addr(0)})
AuthType=auth/munge
AuthInfo=socket={self.sock}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SchedulerType=sched/backfill
SlurmctldPort=6817
SlurmdPort=6818
SlurmdTimeout=20
InactiveLimit=0
KillWait=5
{nodes}
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        with open(self.conf, "w") as f:
            f.write(text)
        with open(os.path.join(self.dir, "cgroup.conf"), "w") as f:  # this machine mounts the v1 hierarchies
            f.write("CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n")

    def _add_hosts(self) -> None:
        lines = "".join(f"{self.addr(i)} {n}  # {self.tag}\n" for i, n in enumerate(self.names))
        lines += f"{self.addr(0)} {self.names[0]}c  # {self.tag}\n"  # the controller's name
        with open(HOSTS, "a") as f:
            f.write(lines)
        self._hosts_added = True

    def _remove_hosts(self) -> None:
        if not self._hosts_added:
            return
        with open(HOSTS) as f:
            keep = [ln for ln in f if not ln.rstrip().endswith(f"# {self.tag}")]
        with open(HOSTS, "w") as f:
            f.writelines(keep)
        self._hosts_added = False

    # -- using it --------------------------------------------------------------------------------------
    def run(self, argv: Sequence[str], timeout: float = 300, env: Optional[Mapping[str, str]] = None,
            check: bool = False) -> subprocess.CompletedProcess:
        """A SLURM client command in node 0's namespace (it reaches slurmctld there)."""
        return subprocess.run(["ip", "netns", "exec", self.net.netns[0], *argv], env=self.env(env),
                              capture_output=True, text=True, timeout=timeout, check=check)

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        last = ""
        while time.time() < deadline:
            r = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=20)
            last = (r.stdout + r.stderr).strip()
            states = [ln.split()[-1] for ln in r.stdout.strip().splitlines() if ln.strip()]
            if len(states) == self.nodes and all(s.startswith("idle") for s in states):
                return
            time.sleep(1)
        logs = "".join(open(os.path.join(self.dir, f)).read()[-1500:] for f in os.listdir(self.dir) if f.endswith(".out"))
        raise SlurmUnavailable(f"the SLURM nodes did not become idle within {timeout:.0f} s (sinfo: {last!r}); "
                               f"logs in {self.dir}:\n{logs}")
