"""Shared pieces of the multi-rank tests: bitwise cross-rank comparison, small models, data."""

from __future__ import annotations

import hashlib
import io
import warnings
from typing import Iterable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern as int32 or int64 (NaN == NaN, -0.0 != 0.0): for bitwise comparisons.

    Any dtype: the raw storage is viewed as signed integers of the element's width (complex and other
    16-byte types as pairs of int64), and 1- and 2-byte integers are sign-extended to int32, which is
    one-to-one and a type every backend can all-gather (gloo has no int16)."""
    t = t.detach().contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    size = t.element_size()
    ints = t.view(_INT_VIEW[8] if size > 8 else _INT_VIEW[size])
    return ints.to(torch.int32) if ints.element_size() < 4 else ints


def _dtype_code(dtype: torch.dtype) -> int:
    """A number naming ``dtype`` identically in every process (a hash of its name)."""
    return int.from_bytes(hashlib.blake2b(str(dtype).encode(), digest_size=8).digest(), "little") & ((1 << 62) - 1)


def same_on_all_ranks(t: torch.Tensor) -> bool:
    """True on every rank iff ``t`` has the same dtype, size and bits on every rank (all_gather + torch.equal).

    Works for every dtype (bits() widens 1- and 2-byte types, e.g. bfloat16 / float16, before the gather)."""
    local = bits(t).clone()
    n = dist.get_world_size()
    header = torch.tensor([local.numel(), _dtype_code(t.dtype), local.element_size()], dtype=torch.int64)
    headers = [torch.zeros_like(header) for _ in range(n)]
    dist.all_gather(headers, header)
    if any(not torch.equal(h, header) for h in headers):
        return False
    gathered = [torch.empty_like(local) for _ in range(n)]
    dist.all_gather(gathered, local)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def all_ranks_true(flag: bool) -> bool:
    """Logical AND of a per-rank flag over all ranks (the same answer on every rank)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(int(t) == 1)


def replicated_slots(opt) -> dict[tuple[int, str], torch.Tensor]:
    """{(bucket index, slot name): tensor} of the replicated state ('w' / 'h') of every current bucket."""
    st = opt.hook_state
    return {(i, name): b.slots[name] for i, b in st.blocks().items()
            for name in st.feedback.shared_slots if name in b.slots}


def all_slots(opt) -> dict[tuple[int, str], torch.Tensor]:
    """Clones of every slot (local and replicated) of every current bucket."""
    return {(i, name): t.detach().clone() for i, b in opt.hook_state.blocks().items()
            for name, t in b.slots.items()}


def differing_replicated(opt) -> list[str]:
    """Names of replicated slots / parameters that are not bitwise identical across ranks ([] on all ranks if none).

    Every rank must call this at the same point (it runs collectives in a fixed order)."""
    bad = []
    slots = replicated_slots(opt)
    # the same number of slots on every rank first, so the collectives below line up
    if not same_on_all_ranks(torch.tensor([len(slots)] + [t.numel() for t in slots.values()], dtype=torch.int64)):
        return ["slot layout"]
    for (i, name), t in slots.items():
        if not same_on_all_ranks(t):
            bad.append(f"bucket {i} slot {name}")
    return bad


def differing_params(params: Iterable[torch.Tensor]) -> list[int]:
    """Indices of parameters that are not bitwise identical across ranks."""
    return [j for j, p in enumerate(params) if not same_on_all_ranks(p)]


class MLP(torch.nn.Module):
    """A few Linear layers; with a tiny ``bucket_cap_mb`` DDP splits it into several buckets."""

    def __init__(self, sizes=(32, 64, 64, 64, 8), dtype=torch.float32) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(a, b, dtype=dtype) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, layer in enumerate(self.layers):
            x = layer(x)
            if j < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


def make_mlp_ddp(sizes=(32, 64, 64, 64, 8), dtype=torch.float32, bucket_cap_mb=0.01, seed=0):
    """The same initial MLP on every rank, wrapped in DDP."""
    torch.manual_seed(seed)
    model = MLP(sizes, dtype)
    return model, DDP(model, bucket_cap_mb=bucket_cap_mb)


def batch(rank: int, step: int, n_in: int = 32, n_out: int = 8, rows: int = 16, dtype=torch.float32, seed: int = 0):
    """A deterministic, rank- and step-dependent minibatch (stochastic gradients that differ per rank)."""
    g = torch.Generator().manual_seed(1_000_003 * seed + 7919 * rank + step)
    x = torch.randn(rows, n_in, generator=g, dtype=dtype)
    y = torch.randn(rows, n_out, generator=g, dtype=dtype) + 0.5 * rank
    return x, y


def train_step(ddp, opt, x, y) -> torch.Tensor:
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(ddp(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def load_outcome(opt, sd, catch: "type[BaseException] | tuple" = Exception) -> str:
    """``opt.load_state_dict(sd)`` with warnings silenced: ``"accepted"``, or ``"<Type>: <message>"`` of the
    exception of type ``catch`` it raised (any other propagates), to compare across ranks."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.load_state_dict(sd)
    except catch as exc:
        return f"{type(exc).__name__}: {exc}"
    return "accepted"


def roundtrip(obj):
    """``obj`` through ``torch.save`` / ``torch.load`` in memory, as a checkpoint file would carry it."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)
