"""SPEC §1 compressor contracts, the name registry, and the SPEC §3 exchange rule and byte counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from commopt.compressors import Identity, RandK, ScaledRandK, TopK, make_compressor
from commopt.exchange import Exchange, allgather_bytes, choose_exchange, ring_allreduce_bytes

pytestmark = pytest.mark.timeout(120)

DIMS = [1, 2, 7, 100, 1000]
RATIOS = [0.001, 0.01, 0.1, 0.3, 0.5, 0.9, 1.0]


def _vectors(d: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Gaussian, heavy-tailed (Student-t, df = 1.5: infinite variance) and all-equal test vectors."""
    rng = np.random.default_rng(seed + 1000 * d)
    return {
        "gaussian": torch.from_numpy(rng.standard_normal(d)),
        "student_t": torch.from_numpy(rng.standard_t(1.5, size=d)),
        "all_equal": torch.full((d,), -2.5, dtype=torch.float64),
    }


def _err2(c: torch.Tensor, x: torch.Tensor) -> float:
    return float(((c - x) ** 2).sum())


# --- k = max(1, ⌊r·d⌋) and the size of the message ------------------------------------------------

@pytest.mark.parametrize("cls", [TopK, RandK, ScaledRandK])
@pytest.mark.parametrize("d", DIMS + [33, 12345])
@pytest.mark.parametrize("ratio", RATIOS + [1 / 3, 0.07])
def test_k_from_ratio(cls, d, ratio):
    comp = cls(ratio=ratio)
    assert comp.num_selected(d) == max(1, math.floor(ratio * d))
    x = torch.randn(d, dtype=torch.float64)
    idx, vals = comp.compress(x, step=3, key=1)
    k = comp.num_selected(d)
    assert idx.shape == (k,) and vals.shape == (k,)
    assert idx.dtype == torch.int64
    assert len(set(idx.tolist())) == k, "indices must be distinct"
    assert int(idx.min()) >= 0 and int(idx.max()) < d
    dense = comp.dense(x, step=3, key=1)
    assert dense.shape == x.shape and int((dense != 0).sum()) <= k


@pytest.mark.parametrize("cls", [TopK, RandK])
def test_fixed_k_is_capped_at_d(cls):
    assert cls(k=5).num_selected(100) == 5
    assert cls(k=5).num_selected(3) == 3
    x = torch.randn(3, dtype=torch.float64)
    assert torch.equal(cls(k=5).dense(x), x)  # k >= d sends everything


def test_num_selected_rejects_empty():
    with pytest.raises(ValueError):
        TopK(ratio=0.5).num_selected(0)


# --- TopK: deterministic contraction --------------------------------------------------------------

@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("kind", ["gaussian", "student_t", "all_equal"])
def test_topk_is_contractive(d, ratio, kind):
    """‖C(x) − x‖² ≤ (1 − k/d)‖x‖² for every x (rounding slack 1e-12 relative: all-equal x is the equality case)."""
    x = _vectors(d)[kind]
    comp = TopK(ratio=ratio)
    k = comp.num_selected(d)
    c = comp.dense(x)
    bound = (1 - k / d) * float((x ** 2).sum())
    assert _err2(c, x) <= bound * (1 + 1e-12) + 1e-300
    # TopK keeps the k largest magnitudes: every kept |x_j| ≥ every dropped |x_j|
    kept = c != 0 if kind != "all_equal" else torch.zeros(d, dtype=torch.bool).index_fill_(0, comp.compress(x)[0], True)
    if 0 < k < d:
        assert float(x[kept].abs().min()) >= float(x[~kept].abs().max())
    assert torch.equal(c[kept], x[kept])  # values are unscaled


def test_topk_contractive_many_random_vectors():
    gen = torch.Generator().manual_seed(7)
    for trial in range(200):
        d = int(torch.randint(1, 300, (1,), generator=gen))
        x = torch.randn(d, generator=gen, dtype=torch.float64) * torch.rand(d, generator=gen, dtype=torch.float64) ** 4
        ratio = float(torch.rand((), generator=gen, dtype=torch.float64)) * 0.999 + 0.001
        comp = TopK(ratio=ratio)
        k = comp.num_selected(d)
        assert _err2(comp.dense(x), x) <= (1 - k / d) * float((x ** 2).sum()) * (1 + 1e-12)


def test_topk_is_deterministic_and_ignores_step_and_key():
    x = torch.randn(500, dtype=torch.float64)
    comp = TopK(ratio=0.05)
    ref = comp.compress(x, step=0, key=0)
    for step, key in [(1, 0), (0, 9), (123, 456)]:
        idx, vals = comp.compress(x.clone(), step=step, key=key)
        assert torch.equal(idx, ref[0]) and torch.equal(vals, ref[1])


def test_topk_blockwise_contraction_min_over_blocks():
    """SPEC §1: TopK per block is contractive with δ = min_b k_b/d_b."""
    rng = np.random.default_rng(3)
    blocks = [torch.from_numpy(rng.standard_t(1.5, size=d)) for d in (10, 37, 200)]
    comp = TopK(ratio=0.1)
    err = sum(_err2(comp.dense(b), b) for b in blocks)
    delta = min(comp.num_selected(b.numel()) / b.numel() for b in blocks)
    norm2 = sum(float((b ** 2).sum()) for b in blocks)
    assert err <= (1 - delta) * norm2 * (1 + 1e-12)


# --- RandK: contraction in expectation -----------------------------------------------------------------

def _strata_sizes(d: int, k: int) -> np.ndarray:
    """|stratum(j)| for every coordinate j: RandK's strata [⌊s·d/k⌋, ⌊(s+1)·d/k⌋) (SPEC §10)."""
    bounds = (np.arange(k + 1) * d) // k
    return np.repeat(np.diff(bounds), np.diff(bounds))


@pytest.mark.parametrize("d,ratio", [(10, 0.1), (10, 0.5), (50, 0.2), (200, 0.05), (7, 0.3), (1000, 0.013)])
@pytest.mark.parametrize("kind", ["gaussian", "student_t", "all_equal"])
def test_randk_is_contractive_in_mean(d, ratio, kind):
    """Stratified RandK keeps coordinate j with probability 1/|stratum(j)|, so
    E‖C(x) − x‖² = Σ_j (1 − 1/|stratum(j)|) x_j², which is (1 − k/d)‖x‖² when k divides d and at most
    (1 − 1/⌈d/k⌉)‖x‖² always (δ ≥ 1/⌈d/k⌉). Over N draws the sample mean has standard error
    sqrt(Σ_s Var_s / N), Var_s the variance of x_j² over stratum s (one uniform pick per stratum,
    independent across strata); we allow 5·SE plus rounding. Seeded, so deterministic."""
    x = _vectors(d, seed=1)[kind]
    comp = RandK(ratio=ratio, seed=11)
    k = comp.num_selected(d)
    n_draws = 4000
    errs = np.array([_err2(comp.dense(x, step=s, key=5), x) for s in range(n_draws)])
    x2 = (x ** 2).numpy()
    sizes = _strata_sizes(d, k)
    expected = float(((1 - 1 / sizes) * x2).sum())
    assert expected <= (1 - 1 / math.ceil(d / k)) * x2.sum() * (1 + 1e-12)
    if d % k == 0:
        assert expected == pytest.approx((1 - k / d) * x2.sum(), rel=1e-12)
    bounds = (np.arange(k + 1) * d) // k
    var = sum(x2[bounds[s]:bounds[s + 1]].var() for s in range(k))
    tol = 5 * math.sqrt(var / n_draws) + 1e-12 * x2.sum()
    assert abs(errs.mean() - expected) <= tol
    if kind == "all_equal":  # every draw is the equality case
        np.testing.assert_allclose(errs, (1 - k / d) * x2.sum(), rtol=1e-12)


def test_randk_coordinates_are_uniform():
    """Each coordinate is chosen with probability k/d (chi-square-free check: 5 binomial SEs each)."""
    d, k, n_draws = 20, 3, 6000
    comp = RandK(k=k, seed=2)
    counts = torch.zeros(d)
    x = torch.zeros(d)
    for s in range(n_draws):
        counts[comp.select(x, k, s, 0)] += 1
    p = k / d
    se = math.sqrt(n_draws * p * (1 - p))
    assert float((counts - n_draws * p).abs().max()) <= 5 * se
    assert int(counts.sum()) == n_draws * k


def test_randk_values_are_unscaled():
    x = torch.randn(100, dtype=torch.float64)
    idx, vals = RandK(ratio=0.1, seed=1).compress(x, step=4, key=2)
    assert torch.equal(vals, x[idx])


# --- ScaledRandK: unbiased, not contractive ---------------------------------------------------------

@pytest.mark.parametrize("d,k", [(10, 1), (20, 5), (30, 15)])
def test_scaled_randk_is_unbiased(d, k):
    """E C(x) = x. Coordinate j is (d/k)·x_j w.p. k/d, else 0: variance x_j²(d/k − 1) per draw,
    so the mean over N draws is within 5·|x_j|·sqrt((d/k − 1)/N) of x_j (seeded: deterministic)."""
    x = torch.from_numpy(np.random.default_rng(4).standard_normal(d))
    comp = ScaledRandK(k=k, seed=3)
    n_draws = 5000
    acc = torch.zeros(d, dtype=torch.float64)
    for s in range(n_draws):
        acc += comp.dense(x, step=s, key=0)
    mean = acc / n_draws
    se = x.abs() * math.sqrt((d / k - 1) / n_draws)
    assert bool(((mean - x).abs() <= 5 * se + 1e-12).all())


@pytest.mark.parametrize("d,k", [(10, 1), (10, 5), (40, 8), (100, 50)])
def test_scaled_randk_is_not_contractive(d, k):
    """For k ≤ d/2: E‖C(x) − x‖² = (d/k − 1)‖x‖² ≥ ‖x‖² > (1 − δ)‖x‖² for every δ > 0.
    For all-equal x it holds in every single draw; for Gaussian x in mean, with a margin of half the gap
    (the gap to the bound is at least δ‖x‖², far above the sampling error of 3000 draws)."""
    assert k <= d / 2
    comp = ScaledRandK(k=k, seed=5)
    x_eq = torch.full((d,), 1.5, dtype=torch.float64)
    norm2 = float((x_eq ** 2).sum())
    for s in range(20):
        e = _err2(comp.dense(x_eq, step=s), x_eq)
        assert e == pytest.approx((d / k - 1) * norm2, rel=1e-12)
        assert e > (1 - k / d) * norm2  # the contraction bound fails
    x = torch.from_numpy(np.random.default_rng(6).standard_normal(d))
    errs = np.array([_err2(comp.dense(x, step=s), x) for s in range(3000)])
    assert errs.mean() > (1 - 0.5 * k / d) * float((x ** 2).sum())
    assert errs.mean() == pytest.approx((d / k - 1) * float((x ** 2).sum()), rel=0.15)
    assert not ScaledRandK(k=k).contractive and RandK(k=k).contractive and TopK(k=k).contractive


def test_scaled_randk_values():
    x = torch.randn(50, dtype=torch.float64)
    idx, vals = ScaledRandK(k=5, seed=0).compress(x, step=1, key=1)
    assert torch.allclose(vals, x[idx] * 10.0, rtol=0, atol=0)
    # same coordinates as the unscaled RandK with the same seed
    assert torch.equal(idx, RandK(k=5, seed=0).compress(x, step=1, key=1)[0])


# --- RandK's shared index stream -------------------------------------------------------------------

def test_randk_indices_shared_seed_semantics():
    d, k = 1000, 10
    x = torch.randn(d, dtype=torch.float64)
    comp = RandK(k=k, seed=42)
    base = comp.select(x, k, 7, 3)
    assert len(set(base.tolist())) == k
    # same (seed, step, key): identical, also from a fresh object ("another rank")
    assert torch.equal(base, RandK(k=k, seed=42).select(x.clone(), k, 7, 3))
    # different step / key / seed: different (P[equal sets] = 1/C(1000,10), negligible)
    others = [comp.select(x, k, 8, 3), comp.select(x, k, 7, 4), RandK(k=k, seed=43).select(x, k, 7, 3)]
    for o in others:
        assert set(o.tolist()) != set(base.tolist())
    # independent of the data
    for y in (torch.zeros(d, dtype=torch.float64), -x, x * 1e9, torch.randn(d, dtype=torch.float32)):
        assert torch.equal(comp.select(y, k, 7, 3), base)


def test_randk_independent_of_global_rng():
    d, k = 500, 7
    x = torch.randn(d)
    comp = RandK(k=k, seed=1)
    torch.manual_seed(0)
    a = comp.select(x, k, 5, 2)
    torch.manual_seed(12345)
    state = torch.get_rng_state()
    b = comp.select(x, k, 5, 2)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state), "RandK must not consume the global RNG"
    np.random.seed(99)
    assert torch.equal(comp.select(x, k, 5, 2), a)


def test_randk_distinct_indices_many_steps():
    comp = RandK(ratio=0.3, seed=0)
    x = torch.zeros(37)
    k = comp.num_selected(37)
    for s in range(200):
        idx = comp.select(x, k, s, s % 3)
        assert idx.numel() == k and len(set(idx.tolist())) == k


# --- make_compressor ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,cls,ratio,k", [
    ("topk:0.01", TopK, 0.01, None),
    ("TopK:0.5", TopK, 0.5, None),
    ("randk:k=5", RandK, None, 5),
    ("randk:0.05", RandK, 0.05, None),
    ("topk:k=100", TopK, None, 100),
    ("topk:100", TopK, None, 100),
    ("topk:1", TopK, 1.0, None),
    ("topk:1e-3", TopK, 1e-3, None),
    ("scaled_randk:0.1", ScaledRandK, 0.1, None),
])
def test_make_compressor_parses(spec, cls, ratio, k):
    c = make_compressor(spec)
    assert type(c) is cls and c.ratio == ratio and c.k == k


def test_make_compressor_none_and_instances():
    for spec in ("none", "identity", "dense"):
        c = make_compressor(spec)
        assert isinstance(c, Identity)
        x = torch.randn(9)
        assert torch.equal(c.dense(x), x)
    inst = TopK(ratio=0.2)
    assert make_compressor(inst) is inst


@pytest.mark.parametrize("spec", ["topk", "foo:0.1", "topk:0", "topk:1.5", "topk:-1", "topk:nan", "topk:k=0",
                                  "topk:k=-3", "topk:0.0", "topk:abc", "randk:", "none:0.1", "topk:inf", "topk:k=1.5"])
def test_make_compressor_errors(spec):
    with pytest.raises(ValueError):
        make_compressor(spec)


@pytest.mark.parametrize("bad", [0.01, None, 3, ["topk:0.1"]])
def test_make_compressor_type_error(bad):
    with pytest.raises(TypeError):
        make_compressor(bad)


@pytest.mark.parametrize("cls", [TopK, RandK, ScaledRandK])
@pytest.mark.parametrize("kwargs", [
    {"ratio": 0}, {"ratio": 0.0}, {"ratio": -0.1}, {"ratio": 1.0000001}, {"ratio": 2},
    {"ratio": float("nan")}, {"ratio": float("inf")}, {"ratio": True}, {"ratio": "0.1"},
    {"k": 0}, {"k": -1}, {"k": True}, {"k": 2.0},
    {"ratio": 0.1, "k": 5}, {},
])
def test_constructor_errors(cls, kwargs):
    with pytest.raises(ValueError):
        cls(**kwargs)


def test_randk_seed_must_be_int():
    with pytest.raises(ValueError):
        RandK(ratio=0.1, seed=True)
    with pytest.raises(ValueError):
        RandK(ratio=0.1, seed=1.5)


def test_constructor_accepts_edges():
    assert TopK(ratio=1).ratio == 1.0
    assert TopK(ratio=1e-9).num_selected(10) == 1
    assert TopK(k=1).k == 1


# --- exchange choice and byte counts (SPEC §3) ------------------------------------------------------

def _exchange(n: int) -> Exchange:
    ex = Exchange.__new__(Exchange)  # no process group needed for the byte formulas
    ex.group, ex.n = None, n
    return ex


@pytest.mark.parametrize("n", [2, 3, 4, 8, 64])
@pytest.mark.parametrize("d", [10, 64, 1000, 4096])
def test_choose_exchange_rule(n, d):
    for k in sorted(k for k in {1, 2, d // (2 * n), d // n - 1, d // n, d // n + 1, d // 2, d - 1, d} if k >= 1):
        # TopK (data-dependent indices): gather iff k/d < 1/n, dense when k >= d
        kind = choose_exchange(TopK(k=k).shared_indices, k, d, n)
        if k >= d:
            assert kind == "dense"
        else:
            assert kind == ("gather" if k * n < d else "dense"), (k, d, n, kind)
            # the rule is exactly "gather moves fewer bytes than a dense ring all-reduce" (4-byte values)
            fewer = allgather_bytes(k, 8, n) < ring_allreduce_bytes(d, 4, n)
            assert (kind == "gather") == fewer
        # RandK (shared seed): all-reduce of the k values
        kind_r = choose_exchange(RandK(k=k).shared_indices, k, d, n)
        assert kind_r == ("dense" if k >= d else "shared")
        assert choose_exchange(ScaledRandK(k=k).shared_indices, k, d, n) == kind_r


@pytest.mark.parametrize("spec", ["topk:0.01,values=int8", "topk:0.01,chunk=4096,values=int8",
                                  "topk:0.01,chunk=4096,values=int4", "topk:0.01,values=bf16"])
@pytest.mark.parametrize("n", [4, 64, 256])
def test_compact_messages_stay_gathered_while_they_move_fewer_bytes(spec, n):
    """SPEC §3's rule counted in bytes: a compact message (SPEC §9) is gathered while n messages of
    wire.nbytes(k, d, float32) bytes cost less than a dense 4-byte ring all-reduce (n·m < 8d), beyond
    k/d < 1/n; the dtype of the bucket does not change the choice."""
    d = 1 << 20
    comp = make_compressor(spec)
    for k in sorted({d // (4 * n), d // n, 2 * d // n, 3 * d // n, d // 2}):
        if k < 1:
            continue
        m = comp.wire.nbytes(k, d, torch.float32)
        kind = choose_exchange(comp.shared_indices, k, d, n, comp.wire)
        assert kind == ("gather" if n * m < 8 * d else "dense"), (spec, k, n, m)
        fewer = allgather_bytes(1, m, n) < ring_allreduce_bytes(d, 4, n)
        assert (kind == "gather") == fewer
    # a compact message beats today's 8-byte one at k/d = 1/n, so it is gathered where today's is not
    k = d // n
    assert choose_exchange(False, k, d, n) == "dense"
    assert choose_exchange(False, k, d, n, comp.wire) == "gather"
    # today's format through the same path: the k/d < 1/n rule, unchanged
    assert choose_exchange(False, k - 1, d, n, TopK(ratio=0.01).wire) == "gather"
    assert choose_exchange(False, k, d, n, TopK(ratio=0.01).wire) == "dense"


def test_byte_formulas_match_spec():
    """SPEC §3 with 4-byte values and int32 indices: dense 2(n−1)/n·4d, TopK (n−1)·8k, RandK 2(n−1)/n·4k."""
    n, d, k = 8, 1_000_000, 10_000
    ex = _exchange(n)
    assert ex.message_bytes("dense", d, d, torch.float32) == pytest.approx(2 * 7 / 8 * 4 * d)  # 7.0e6
    assert ex.message_bytes("dense", d, d, torch.float32) == pytest.approx(7.0e6)
    assert ex.message_bytes("gather", k, d, torch.float32) == pytest.approx(7 * 8 * k)  # 5.6e5
    assert ex.message_bytes("gather", k, d, torch.float32) == pytest.approx(5.6e5)
    assert ex.message_bytes("shared", k, d, torch.float32) == pytest.approx(2 * 7 / 8 * 4 * k)  # 7.0e4
    assert ex.message_bytes("shared", k, d, torch.float32) == pytest.approx(7.0e4)
    # other dtypes: bf16 values travel with int32 indices, float64 values with int64 indices
    assert ex.message_bytes("gather", k, d, torch.bfloat16) == pytest.approx(7 * (2 + 4) * k)
    assert ex.message_bytes("gather", k, d, torch.float64) == pytest.approx(7 * (8 + 8) * k)
    assert ex.message_bytes("dense", d, d, torch.bfloat16) == pytest.approx(2 * 7 / 8 * 2 * d)
    with pytest.raises(ValueError):
        ex.message_bytes("bogus", k, d, torch.float32)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_byte_helpers(n):
    assert ring_allreduce_bytes(100, 4, n) == pytest.approx(2 * (n - 1) / n * 400)
    assert allgather_bytes(100, 8, n) == (n - 1) * 800
    # crossover: equal bytes exactly at k = d/n
    d = 40 * n
    assert allgather_bytes(d // n, 8, n) == pytest.approx(ring_allreduce_bytes(d, 4, n))


# -- the CPU fast path of the reference TopK: exact by sampled pre-selection -------------------------------

@pytest.mark.parametrize("d,k", [(100_000, 1_000), (300_000, 300), (200_000, 49_000), (70_000, 1), (1_000, 10)])
@pytest.mark.parametrize("kind", ["gauss", "heavy", "ties", "zeros", "one_spike"])
def test_reference_topk_is_the_stable_sort_selection(d, k, kind):
    """The reference TopK (keys + sampled pre-selection on the CPU) picks exactly the first k of a stable
    descending sort of |x|: the largest magnitudes, ties to the lowest index, indices increasing."""
    from commopt.kernels.reference import TorchOps
    gen = torch.Generator().manual_seed(d + k)
    x = {"gauss": lambda: torch.randn(d, generator=gen),
         "heavy": lambda: torch.randn(d, generator=gen) / torch.rand(d, generator=gen).pow(2),
         "ties": lambda: torch.randint(-4, 5, (d,), generator=gen).float(),
         "zeros": lambda: torch.zeros(d),
         "one_spike": lambda: torch.zeros(d).index_fill_(0, torch.tensor([d // 3]), -7.0)}[kind]()
    got = TorchOps().topk(x, k)
    want = torch.sort(torch.sort(x.abs(), descending=True, stable=True).indices[:k]).values
    assert torch.equal(got, want)
