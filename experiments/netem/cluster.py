"""An emulated multi-node cluster on one Linux machine: network namespaces on a bridge, links shaped with ``tc``.

Each *node* is a network namespace with one ``eth0`` (a veth pair whose other end sits on a
Linux bridge in the root namespace) and its own loopback. All ranks of a node share that
namespace, so intra-node traffic stays on the node while inter-node traffic crosses the node's
link. Every link is shaped with ``tc`` in both directions (the namespace side shapes what
the node sends, the bridge side what it receives): ``rate`` each way, ``delay`` and ``loss`` on
what the node sends, so a round trip between nodes a and b adds ``delay_a + delay_b``.

Faults while running: :meth:`Cluster.partition` (the node's bridge port stops forwarding: every
packet to and from it vanishes silently, as behind a dead switch port), :meth:`Cluster.slow`
(extra delay), :meth:`Cluster.set_rate` (a slower link), :meth:`Cluster.heal`.

Rates are shaped with ``tbf``; ``delay``/``loss`` (and :meth:`Cluster.slow`) need the kernel's
``sch_netem`` and raise :class:`NetemUnavailable` saying so where it is missing (as on the machine
this was written on: only tbf, htb and pfifo exist there), so a slow node is then emulated with
:meth:`Cluster.set_rate`.

Needs root and iproute2 (``ip``, ``tc``, ``bridge``); :func:`check_support` raises :class:`NetemUnavailable`
with the reason otherwise. Everything is torn down on exit, on an exception, on Ctrl-C, on SIGTERM /
SIGHUP (turned into ``SystemExit`` when no handler was set) and at interpreter exit; objects left by a run that was SIGKILLed
(names carry the creating process's id) are removed by the next :class:`Cluster`, or by
:func:`cleanup_stale`.

    with Cluster(nodes=2, ranks_per_node=1, rate="1gbit") as c:
        procs = c.start_ranks([sys.executable, "train.py"])      # one process per rank
        c.partition(1); ...; c.heal(1)
        codes = c.wait(timeout=60)
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Optional

__all__ = ["Cluster", "NetemError", "NetemUnavailable", "RankProc", "check_support", "cleanup_stale", "list_objects"]

#: every object we create starts with this (interface names are limited to 15 characters)
PREFIX = "cnm"
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"
_counter = itertools.count()
_live: "set[Cluster]" = set()
_live_lock = threading.Lock()


class NetemError(RuntimeError):
    """A command that builds, shapes or tears down the emulated cluster failed."""


class NetemUnavailable(NetemError):
    """The emulated cluster cannot be built here (not root, no ``ip``/``tc``, no namespaces)."""


def _b36(n: int, width: int) -> str:
    s = ""
    while n:
        n, d = divmod(n, 36)
        s = _B36[d] + s
    return s.rjust(width, "0")[-width:]


def _run(args: Sequence[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise NetemUnavailable(f"{args[0]!r} not found: install iproute2") from e
    if check and res.returncode != 0:
        raise NetemError(f"`{' '.join(args)}` failed (rc {res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    return res


def check_support() -> None:
    """Raise :class:`NetemUnavailable` saying why, unless namespaces, veth, bridges and netem work here."""
    if not sys.platform.startswith("linux"):
        raise NetemUnavailable(f"network namespaces need Linux, this is {sys.platform}")
    if os.geteuid() != 0:
        raise NetemUnavailable("creating network namespaces needs root (euid is %d)" % os.geteuid())
    for tool in ("ip", "tc", "bridge"):
        if shutil.which(tool) is None:
            raise NetemUnavailable(f"`{tool}` not found on PATH: install iproute2")
    # a throw-away namespace proves that netns works (a container may forbid it)
    name = f"{PREFIX}{_b36(os.getpid(), 5)}z-probe"
    res = _run(["ip", "netns", "add", name], check=False)
    if res.returncode != 0:
        raise NetemUnavailable(f"`ip netns add` failed: {res.stderr.strip()}")
    _run(["ip", "netns", "del", name], check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_NAME_RE = re.compile(rf"^{PREFIX}([0-9a-z]{{5}})([0-9a-z])")


def _owner_pid(name: str) -> Optional[int]:
    m = _NAME_RE.match(name)
    return int(m.group(1), 36) if m else None


def list_objects() -> dict[str, list[str]]:
    """Our namespaces and (host-side) links currently present: ``{"netns": [...], "links": [...]}``."""
    out = _run(["ip", "netns", "list"], check=False).stdout
    ns = [ln.split()[0] for ln in out.splitlines() if ln.strip() and ln.split()[0].startswith(PREFIX)]
    out = _run(["ip", "-o", "link", "show"], check=False).stdout
    links = []
    for ln in out.splitlines():
        parts = ln.split(":")
        if len(parts) > 1:
            name = parts[1].strip().split("@")[0]
            if name.startswith(PREFIX):
                links.append(name)
    return {"netns": ns, "links": links}


def _kill_ns_pids(ns: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(p) for p in _run(["ip", "netns", "pids", ns], check=False).stdout.split() if p.isdigit()]
        pids = [p for p in pids if p != os.getpid()]
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 2.0
        while time.time() < deadline and any(_pid_alive(p) for p in pids):
            time.sleep(0.05)


def _delete(netns: Sequence[str], links: Sequence[str]) -> None:
    for ns in netns:
        _kill_ns_pids(ns)
        _run(["ip", "netns", "del", ns], check=False)
    # host-side veths first (deleting one deletes its peer), bridges last
    for name in sorted(links, key=lambda n: n.endswith("b")):
        _run(["ip", "link", "del", name], check=False)


def cleanup_stale(all_: bool = False) -> list[str]:
    """Remove namespaces and links left by runs whose creating process is gone (``all_``: every one of ours)."""
    objs = list_objects()
    pick = lambda n: all_ or (lambda p: p is None or not _pid_alive(p))(_owner_pid(n))  # noqa: E731
    ns = [n for n in objs["netns"] if pick(n)]
    links = [n for n in objs["links"] if pick(n)]
    _delete(ns, links)
    return ns + links


def _rate(value: str) -> str:
    if not re.fullmatch(r"\d+(\.\d+)?([kmgt]?bit|[kmgt]?bps)", value.strip().lower()):
        raise ValueError(f"rate must look like 1gbit / 100mbit / 500kbit, got {value!r}")
    return value.strip().lower()


def _time(value: "str | float | int") -> str:
    if isinstance(value, (int, float)):
        return f"{float(value) * 1000:g}ms"  # seconds
    v = value.strip().lower()
    if not re.fullmatch(r"\d+(\.\d+)?(us|ms|s)", v):
        raise ValueError(f"delay must look like 20ms / 500us / 0.05 (seconds), got {value!r}")
    return v


def _secs(t: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(us|ms|s)", t)
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)] if m else 0.0


def _bits_per_s(rate: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]?)(bit|bps)", rate)
    v = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2)]
    return v * (8 if m.group(3) == "bps" else 1)


_NETEM: Optional[bool] = None


def _netem_available() -> bool:
    """Whether ``tc qdisc ... netem`` works here (probed once on a throw-away veth pair)."""
    global _NETEM
    if _NETEM is None:
        a, b = f"{PREFIX}{_b36(os.getpid(), 5)}zqa", f"{PREFIX}{_b36(os.getpid(), 5)}zqb"
        _run(["ip", "link", "add", a, "type", "veth", "peer", "name", b], check=False)
        _NETEM = _run(["tc", "qdisc", "add", "dev", a, "root", "netem", "delay", "1ms"], check=False).returncode == 0
        _run(["ip", "link", "del", a], check=False)
    return _NETEM


@dataclass
class RankProc:
    """A process started on the cluster: one rank (``mode="ranks"``) or one launcher per node."""

    popen: subprocess.Popen
    node: int
    rank: Optional[int]  # None for a per-node launcher
    local_rank: Optional[int]
    argv: list[str]
    log: Optional[str] = None
    started: float = field(default_factory=time.time)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> Optional[int]:
        return self.popen.poll()

    def signal(self, sig: int = signal.SIGKILL) -> None:
        try:
            self.popen.send_signal(sig)
        except ProcessLookupError:
            pass


@dataclass
class _Link:
    rate: str
    delay: str
    loss: float


class Cluster:
    """``nodes`` namespaces × ``ranks_per_node`` ranks on a bridge, links shaped to ``rate``/``delay``/``loss``.

    Args:
        nodes: M ≥ 1.
        ranks_per_node: R ≥ 1 (ranks of a node share its namespace).
        rate: each link's rate each way (``tc`` syntax: ``"1gbit"``, ``"100mbit"``); ``None`` = unshaped.
        delay: one-way delay added to what each node sends (``"20ms"`` or seconds).
        loss: percentage of the node's outgoing packets dropped at random.
        subnet: the first three octets of the nodes' /24 (node i gets ``.{i+1}``).
        master_port: MASTER_PORT handed to the ranks.
        limit: netem queue length in packets (large, so a delay × rate product does not drop).
    """

    def __init__(self, nodes: int = 2, ranks_per_node: int = 1, rate: Optional[str] = "1gbit",
                 delay: "str | float" = "0ms", loss: float = 0.0, *, subnet: str = "10.231.0",
                 master_port: int = 29500, limit: int = 100000) -> None:
        if not isinstance(nodes, int) or nodes < 1 or nodes > 200:
            raise ValueError(f"nodes must be an integer in [1, 200], got {nodes!r}")
        if not isinstance(ranks_per_node, int) or ranks_per_node < 1:
            raise ValueError(f"ranks_per_node must be an integer >= 1, got {ranks_per_node!r}")
        if not 0.0 <= float(loss) <= 100.0:
            raise ValueError(f"loss is a percentage in [0, 100], got {loss!r}")
        self.nodes, self.ranks_per_node = nodes, ranks_per_node
        self.world_size = nodes * ranks_per_node
        self.rate = None if rate is None else _rate(rate)
        self.delay = _time(delay)
        self.loss = float(loss)
        self.subnet = subnet
        self.master_port = int(master_port)
        self.limit = int(limit)
        self.tag = f"{PREFIX}{_b36(os.getpid(), 5)}{_B36[next(_counter) % 36]}"
        self.bridge = f"{self.tag}b"
        self.netns = [f"{self.tag}-n{i}" for i in range(nodes)]
        self.host_if = [f"{self.tag}h{i}" for i in range(nodes)]
        self.ips = [f"{subnet}.{i + 1}" for i in range(nodes)]
        self.links = [_Link(self.rate or "", self.delay, self.loss) for _ in range(nodes)]
        self.procs: list[RankProc] = []
        self.shaping: dict[int, str] = {}
        self.partitioned: dict[int, str] = {}
        self._up = False
        self._logs: list[IO] = []

    # ------------------------------------------------------------------ lifecycle

    @property
    def master_addr(self) -> str:
        return self.ips[0]

    def __enter__(self) -> "Cluster":
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> "Cluster":
        """Build the namespaces, veths, bridge and qdiscs (cleaning stale objects of dead runs first)."""
        if self._up:
            return self
        check_support()
        cleanup_stale()
        _install_signal_handlers()
        with _live_lock:
            _live.add(self)
        self._up = True
        try:
            _run(["ip", "link", "add", "name", self.bridge, "type", "bridge"])
            _run(["ip", "link", "set", self.bridge, "up"])
            for i in range(self.nodes):
                ns, host, peer = self.netns[i], self.host_if[i], f"{self.tag}p{i}"
                _run(["ip", "netns", "add", ns])
                _run(["ip", "link", "add", host, "type", "veth", "peer", "name", peer])
                _run(["ip", "link", "set", peer, "netns", ns])
                _run(["ip", "link", "set", host, "master", self.bridge])
                _run(["ip", "link", "set", host, "up"])
                self._ns(i, "ip", "link", "set", "lo", "up")
                self._ns(i, "ip", "link", "set", peer, "name", "eth0")
                self._ns(i, "ip", "addr", "add", f"{self.ips[i]}/24", "dev", "eth0")
                self._ns(i, "ip", "link", "set", "eth0", "up")
                self._shape(i)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Stop every process started here, then delete the namespaces, veths and bridge (idempotent)."""
        if not self._up:
            return
        try:
            self.kill_all()
        finally:
            _delete(self.netns, self.host_if + [self.bridge])
            for f in self._logs:
                try:
                    f.close()
                except OSError:
                    pass
            self._logs.clear()
            self._up = False
            with _live_lock:
                _live.discard(self)

    # ------------------------------------------------------------------ shaping and faults

    def _ns(self, node: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(["ip", "netns", "exec", self.netns[node], *args], check=check)

    def _netem(self, link: _Link, outgoing: bool) -> list[str]:
        args = ["netem", "limit", str(self.limit)]
        if outgoing and _secs(link.delay) > 0:
            args += ["delay", link.delay]
        if outgoing and link.loss > 0:
            args += ["loss", f"{link.loss:g}%"]
        if link.rate:
            args += ["rate", link.rate]
        return args

    def _tbf(self, link: _Link) -> list[str]:
        # burst: 1 ms at the rate, at least two 64 KiB GSO segments; queue: 100 ms at the rate
        burst = max(131072, int(_bits_per_s(link.rate) / 8 / 1000))
        return ["tbf", "rate", link.rate, "burst", str(burst), "latency", "100ms"]

    def _shape(self, node: int, replace: bool = True) -> None:
        link = self.links[node]
        needs_netem = _secs(link.delay) > 0 or link.loss > 0
        if needs_netem and not _netem_available():
            raise NetemUnavailable(
                f"delay/loss need the kernel's netem qdisc (sch_netem), which this kernel lacks "
                f"(`tc qdisc add ... netem` says 'Specified qdisc kind is unknown'); rate shaping (tbf) and "
                f"partition() work without it: emulate a slow node with set_rate(node, '50mbit')")
        for outgoing in (True, False):
            if needs_netem:
                q = self._netem(link, outgoing)
            elif link.rate:
                q = self._tbf(link)
            else:
                q = ["pfifo", "limit", str(self.limit)]
            cmd = ["tc", "qdisc", "replace", "dev", "eth0" if outgoing else self.host_if[node], "root", *q]
            if outgoing:
                self._ns(node, *cmd)
            else:
                _run(cmd)
        self.shaping[node] = " ".join(q)

    def _check_node(self, node: int) -> None:
        if not self._up:
            raise NetemError("the cluster is not up")
        if not 0 <= node < self.nodes:
            raise ValueError(f"node must be in [0, {self.nodes}), got {node!r}")

    def partition(self, node: int, how: str = "block") -> None:
        """Cut ``node`` off until :meth:`heal`. ``how="block"`` (default): its bridge port stops forwarding,
        so every packet to and from it vanishes silently while both ends keep their carrier (a dead switch
        port: no RST, no ICMP, the node sees its link up); ``how="down"``: its link goes down (the node
        sees NO-CARRIER)."""
        self._check_node(node)
        if how == "block":
            _run(["bridge", "link", "set", "dev", self.host_if[node], "state", "0"])
        elif how == "down":
            _run(["ip", "link", "set", self.host_if[node], "down"])
        else:
            raise ValueError(f"how must be 'block' or 'down', got {how!r}")
        self.partitioned[node] = how

    def slow(self, node: int, delay: "str | float") -> None:
        """Set the one-way delay added to what ``node`` sends (``"30ms"`` or seconds; needs sch_netem)."""
        self._check_node(node)
        old = self.links[node].delay
        self.links[node].delay = _time(delay)
        try:
            self._shape(node)
        except BaseException:
            self.links[node].delay = old
            raise

    def set_rate(self, node: int, rate: str) -> None:
        """Set ``node``'s link rate each way (``"50mbit"``): a slow link without sch_netem."""
        self._check_node(node)
        self.links[node].rate = _rate(rate)
        self._shape(node)

    def heal(self, node: int) -> None:
        """Undo :meth:`partition`, :meth:`slow` and :meth:`set_rate` on ``node``: back to the configured link."""
        self._check_node(node)
        how = self.partitioned.pop(node, None)
        if how == "block":
            _run(["bridge", "link", "set", "dev", self.host_if[node], "state", "3"])
        elif how == "down":
            _run(["ip", "link", "set", self.host_if[node], "up"])
        self.links[node] = _Link(self.rate or "", self.delay, self.loss)
        self._shape(node)

    def qdisc(self, node: int) -> str:
        """``tc qdisc show`` of both ends of ``node``'s link (for logs)."""
        a = self._ns(node, "tc", "qdisc", "show", "dev", "eth0").stdout.strip()
        b = _run(["tc", "qdisc", "show", "dev", self.host_if[node]]).stdout.strip()
        return f"node{node} out: {a}\nnode{node} in:  {b}"

    # ------------------------------------------------------------------ processes

    def rank_env(self, rank: int, extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
        """The environment of global rank ``rank`` (torchrun's ``env://`` variables plus socket interfaces)."""
        node, local = divmod(rank, self.ranks_per_node)
        env = self.node_env(node, extra)
        env.update(RANK=str(rank), LOCAL_RANK=str(local))
        return env

    def node_env(self, node: int, extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
        env = dict(os.environ)
        # a launcher's variables from the parent (srun, mpiexec) would confuse commopt.init_distributed
        for key in list(env):
            if key.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "HYDI_", "TORCHELASTIC_")) or key in (
                    "MPI_LOCALRANKID", "RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK"):
                del env[key]
        env.update(MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port),
                   WORLD_SIZE=str(self.world_size), LOCAL_WORLD_SIZE=str(self.ranks_per_node),
                   NODE_RANK=str(node), GROUP_RANK=str(node), NNODES=str(self.nodes),
                   NETEM_NODE=str(node), NETEM_NODE_IP=self.ips[node])
        for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TP_SOCKET_IFNAME"):
            env.setdefault(var, "eth0")
        env.setdefault("PYTHONUNBUFFERED", "1")
        if extra:
            env.update({k: str(v) for k, v in extra.items()})
        return env

    def _popen(self, node: int, argv: Sequence[str], env: dict, log: "str | int | None",
               rank: Optional[int], local: Optional[int]) -> RankProc:
        """``log``: a file path, ``subprocess.PIPE`` (read ``proc.popen.stdout``) or ``None`` (inherit)."""
        if not self._up:
            raise NetemError("the cluster is not up (use it as a context manager or call up())")
        out = log  # None: inherit; subprocess.PIPE: a pipe; a path: that file
        if isinstance(log, str):
            out = open(log, "w")
            self._logs.append(out)
        p = subprocess.Popen(["ip", "netns", "exec", self.netns[node], *argv], env=env, stdout=out,
                             stderr=subprocess.STDOUT if out is not None else None, start_new_session=True)
        rp = RankProc(p, node, rank, local, list(argv), log if isinstance(log, str) else None)
        self.procs.append(rp)
        return rp

    def start(self, rank: int, argv: Sequence[str], env: Optional[Mapping[str, str]] = None,
              log: "str | int | None" = None) -> RankProc:
        """Start ``argv`` as global rank ``rank`` inside its node's namespace (stdout+stderr to ``log``)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank!r}")
        node, local = divmod(rank, self.ranks_per_node)
        return self._popen(node, argv, self.rank_env(rank, env), log, rank, local)

    def start_ranks(self, argv: Sequence[str], env: Optional[Mapping[str, str]] = None,
                    log_dir: "str | int | None" = None) -> list[RankProc]:
        """One process per rank; ``{rank}``/``{node}``/``{local_rank}`` in ``argv`` are substituted.
        Output goes to ``log_dir/rank{r}.log`` (``subprocess.PIPE``: pipes; ``None``: inherited)."""
        procs = []
        for r in range(self.world_size):
            node, local = divmod(r, self.ranks_per_node)
            a = [x.format(rank=r, node=node, local_rank=local) if "{" in x else x for x in argv]
            log = os.path.join(log_dir, f"rank{r}.log") if isinstance(log_dir, str) else log_dir
            procs.append(self.start(r, a, env, log))
        return procs

    def torchrun_argv(self, node: int, argv: Sequence[str], torchrun_args: Sequence[str] = ()) -> list[str]:
        """The ``torchrun`` command line of ``node`` (static rendezvous at node 0)."""
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(self.nodes),
                "--nproc_per_node", str(self.ranks_per_node), "--node_rank", str(node),
                "--master_addr", self.master_addr, "--master_port", str(self.master_port),
                *torchrun_args, *argv]

    def start_torchrun(self, argv: Sequence[str], env: Optional[Mapping[str, str]] = None,
                       log_dir: "str | int | None" = None, torchrun_args: Sequence[str] = ()) -> list[RankProc]:
        """One ``torchrun --nnodes M --nproc_per_node R --node_rank i`` per node running ``argv``
        (a script and its arguments, as torchrun takes them; ``--no-python`` in ``torchrun_args`` for a binary)."""
        procs = []
        for i in range(self.nodes):
            log = os.path.join(log_dir, f"node{i}.log") if isinstance(log_dir, str) else log_dir
            e = self.node_env(i, env)
            e.pop("WORLD_SIZE", None)  # torchrun sets it for its workers
            procs.append(self._popen(i, self.torchrun_argv(i, argv, torchrun_args), e, log, None, None))
        return procs

    def wait(self, timeout: Optional[float] = None, procs: Optional[Sequence[RankProc]] = None) -> list[Optional[int]]:
        """Wait until every process (default: all started) ended or ``timeout`` s passed; their return codes
        (``None`` for one still running)."""
        procs = list(self.procs if procs is None else procs)
        deadline = None if timeout is None else time.time() + timeout
        for p in procs:
            left = None if deadline is None else max(0.0, deadline - time.time())
            try:
                p.popen.wait(left)
            except subprocess.TimeoutExpired:
                pass
        return [p.popen.poll() for p in procs]

    def kill_all(self, grace: float = 3.0) -> None:
        """SIGTERM every started process group, SIGKILL what is left after ``grace`` s, then anything else
        still running in the namespaces."""
        running = [p for p in self.procs if p.popen.poll() is None]
        for p in running:
            try:
                os.killpg(p.popen.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + grace
        for p in running:
            try:
                p.popen.wait(max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            try:
                os.killpg(p.popen.pid, signal.SIGKILL)  # also stray children of an ended leader
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.popen.wait(2.0)
            except subprocess.TimeoutExpired:
                pass
        for ns in self.netns:
            _kill_ns_pids(ns)


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def _install_signal_handlers() -> None:
    """SIGTERM / SIGHUP left at their default (die at once, no cleanup) become ``SystemExit``, so ``with
    Cluster(...)`` blocks and :func:`atexit` unwind and tear down; handlers a script set are left alone."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _raise_exit)


@atexit.register
def _teardown_live() -> None:
    with _live_lock:
        live = list(_live)
    for c in live:
        try:
            c.down()
        except Exception:  # noqa: BLE001
            pass
