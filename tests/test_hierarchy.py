"""commopt.hierarchy without process groups: node-size resolution, shard geometry, byte formulas, and
the launch chain that keeps a phase's collectives in bucket order (SPEC §8)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.futures import Future

from commopt.hierarchy import (LaunchChain, intra_node_bytes, local_world_size, resolve_node_size, shard_key,
                               shard_size)


@pytest.mark.parametrize("env, want", [
    ({}, None),
    ({"LOCAL_WORLD_SIZE": "4"}, 4),
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, 2),
    ({"MPI_LOCALNRANKS": "8"}, 8),
    ({"SLURM_NTASKS_PER_NODE": "4"}, 4),
    ({"SLURM_TASKS_PER_NODE": "2(x3)"}, 2),
    ({"SLURM_TASKS_PER_NODE": "2(x2),2"}, 2),
    ({"SLURM_TASKS_PER_NODE": "2(x2),1"}, None),   # uneven nodes: no single node size
    ({"LOCAL_WORLD_SIZE": "0", "SLURM_NTASKS_PER_NODE": "3"}, 3),
    ({"LOCAL_WORLD_SIZE": "x"}, None),
])
def test_local_world_size(env, want):
    assert local_world_size(env) == want


def test_resolve_node_size():
    assert resolve_node_size(None, 8) == 1
    assert resolve_node_size(1, 8) == 1
    assert resolve_node_size(4, 8) == 4
    assert resolve_node_size("auto", 8, {"LOCAL_WORLD_SIZE": "2"}) == 2
    assert resolve_node_size("AUTO", 8, {}) == 1
    with pytest.raises(ValueError, match="does not divide the world size 8"):
        resolve_node_size(3, 8)
    with pytest.raises(ValueError, match="'auto' found 3 ranks per node, which does not divide the world size 4"):
        resolve_node_size("auto", 4, {"LOCAL_WORLD_SIZE": "3"})
    for bad in (0, -2, 2.0, True, "two"):
        with pytest.raises(ValueError, match="node_size must be"):
            resolve_node_size(bad, 8)


def test_shards_and_bytes():
    assert [shard_size(d, 4) for d in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    # reduce-scatter + all-gather of the padded bucket: 2 (L-1) ceil(d/L) s
    assert intra_node_bytes(10, 4, 4) == 2 * 3 * 3 * 4
    assert intra_node_bytes(10, 4, 4, reduce_scatter=False) == 3 * 3 * 3 * 4
    assert intra_node_bytes(10, 1, 4) == 0
    keys = {shard_key(12345, j) for j in range(8)}
    assert len(keys) == 8 and all(0 <= k < 1 << 62 for k in keys)
    assert shard_key(12345, 3) == shard_key(12345, 3)


def test_launch_chain_launches_in_call_order_whatever_order_rounds_get_ready():
    chain = LaunchChain()
    like = torch.zeros(1)
    ready = [Future() for _ in range(4)]
    launched: list[int] = []
    done = [Future() for _ in range(4)]

    def launcher(i):
        def launch():
            launched.append(i)
            return done[i]
        return launch

    results = [chain.after(ready[i], launcher(i), like) for i in range(4)]
    for i in (2, 3, 1):          # round 0 not ready yet: nothing may launch
        ready[i].set_result(i)
    assert launched == []
    ready[0].set_result(0)       # now all four, in call order
    assert launched == [0, 1, 2, 3]
    for i in (3, 0, 2, 1):
        done[i].set_result(10 * i)
    assert [r.wait() for r in results] == [0, 10, 20, 30]


def test_launch_chain_a_failure_stops_every_later_launch():
    chain = LaunchChain()
    like = torch.zeros(1)
    ready = [Future() for _ in range(3)]
    launched: list[int] = []

    def launch(i):
        def go():
            launched.append(i)
            f = Future()
            f.set_result(i)
            return f
        return go

    results = [chain.after(ready[i], launch(i), like) for i in range(3)]
    ready[0].set_exception(RuntimeError("peer died"))
    ready[1].set_result(1)
    ready[2].set_result(2)
    assert launched == []
    for r in results:
        with pytest.raises(RuntimeError, match="peer died"):
            r.wait()


def test_launch_chain_from_threads():
    chain = LaunchChain()
    like = torch.zeros(1)
    n = 50
    ready = [Future() for _ in range(n)]
    order: list[int] = []
    lock = threading.Lock()

    def launch(i):
        def go():
            with lock:
                order.append(i)
            f = Future()
            f.set_result(i)
            return f
        return go

    results = [chain.after(ready[i], launch(i), like) for i in range(n)]
    threads = [threading.Thread(target=ready[i].set_result, args=(i,)) for i in reversed(range(n))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.wait() for r in results] == list(range(n))
    assert order == list(range(n))
    chain.reset()
    f = Future()
    r = chain.after(f, launch(99), like)
    f.set_result(None)
    assert r.wait() == 99


def test_density_warmup_with_a_chunked_topk_is_refused_at_construction(monkeypatch):
    import torch.distributed as dist

    import commopt

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    with pytest.raises(ValueError, match="cannot be combined with a chunked TopK"):
        commopt.CompressionState("topk:0.01,chunk=4096", "ef14", density_warmup=(0.1, 30))
