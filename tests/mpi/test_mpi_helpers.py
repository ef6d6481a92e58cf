"""The cross-rank comparison helpers themselves (mpi_helpers.bits / same_on_all_ranks) for every dtype:
gloo cannot all-gather int16, so 2-byte tensors (bfloat16, float16) are compared through a widened view."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mpi_helpers import MLP, all_ranks_true, bits, differing_params, same_on_all_ranks

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int16, torch.int8, torch.uint8,
          torch.bool, torch.int64, torch.complex64]


def _sample(dtype: torch.dtype) -> torch.Tensor:
    """The same 37 values on every rank (NaN and -0.0 included where the dtype has them)."""
    g = torch.Generator().manual_seed(99)
    x = torch.randn(37, generator=g, dtype=torch.float64) * 50
    if dtype == torch.bool:
        return x > 0
    if dtype.is_complex:
        return torch.complex(x, -x).to(dtype)
    if not dtype.is_floating_point:
        return x.abs().to(dtype) if dtype == torch.uint8 else x.to(dtype)
    t = x.to(dtype)
    t[3], t[5], t[7] = float("nan"), -0.0, float("inf")
    return t


def _flip_lowest_bit(t: torch.Tensor, j: int) -> torch.Tensor:
    """A copy of ``t`` with the lowest bit of the raw storage of element ``j`` flipped."""
    out = t.clone()
    raw = out.view(-1).view(torch.uint8)
    raw[j * t.element_size()] ^= 1
    return out


def test_bits_is_one_to_one_on_every_16_bit_pattern():
    """All 65536 bit patterns of bfloat16 / float16 (every NaN, ±0, ±inf) give distinct integers that an
    all-gather on gloo can carry (int32), and equal patterns give equal integers."""
    patterns = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.bfloat16, torch.float16):
        values = patterns.view(dtype)
        b = bits(values)
        assert b.dtype == torch.int32 and b.numel() == 65536
        assert torch.unique(b).numel() == 65536
        assert torch.equal(b, bits(values.clone()))
        assert not torch.equal(bits(torch.tensor([0.0], dtype=dtype)), bits(torch.tensor([-0.0], dtype=dtype)))


def test_bits_accepts_every_dtype_and_a_strided_view():
    for dtype in DTYPES:
        b = bits(_sample(dtype))
        assert b.dtype in (torch.int32, torch.int64), dtype
        assert b.numel() == 37 * max(1, _sample(dtype).element_size() // 8), dtype
    m = torch.arange(12, dtype=torch.float16).reshape(3, 4)
    assert torch.equal(bits(m.t()), bits(m.t().contiguous()))


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).removeprefix("torch.") for d in DTYPES])
def test_same_on_all_ranks_for_every_dtype(world, dtype):
    """True for the same bits on every rank (NaN == NaN), False on every rank when the last rank differs in
    one bit, in size, or only in dtype (the same bytes read as another type)."""
    r, n = world.rank, world.size
    t = _sample(dtype)
    results = {"same": same_on_all_ranks(t)}
    flipped = _flip_lowest_bit(t, 11) if r == n - 1 else t
    results["one bit"] = same_on_all_ranks(flipped)
    results["size"] = same_on_all_ranks(t[:-1] if r == n - 1 else t)
    if t.element_size() == 2:  # bfloat16 <-> float16 <-> int16: the same 2-byte patterns, another dtype
        other = torch.int16 if dtype != torch.int16 else torch.float16
        results["dtype"] = same_on_all_ranks(t.view(other) if r == n - 1 else t)
    if dtype.is_floating_point:
        zero = torch.zeros(4, dtype=dtype)
        results["-0.0"] = same_on_all_ranks(zero.neg() if r == n - 1 else zero)
    want = {key: key == "same" for key in results}
    assert all_ranks_true(results == want), f"rank {r}: got {results}, want {want}"
    dist.barrier()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_differing_params_of_a_low_precision_model(world, dtype):
    """differing_params on a bf16/fp16 model: [] for identical models, exactly the parameter that one rank
    nudged by one ulp otherwise."""
    r, n = world.rank, world.size
    torch.manual_seed(0)
    model = MLP((8, 16, 4), dtype)
    params = list(model.parameters())
    same = differing_params(params)
    if r == n - 1:
        with torch.no_grad():
            params[2].view(-1)[0] = torch.nextafter(params[2].view(-1)[0], torch.tensor(10.0, dtype=dtype))
    nudged = differing_params(params)
    assert all_ranks_true(same == [] and nudged == [2]), f"rank {r}: {same}, {nudged}"
    dist.barrier()
