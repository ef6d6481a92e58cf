"""SPEC §9 compact messages: value codecs against NumPy references, the ε² bound, contractivity of Q∘C,
NaN/inf poisoning, chunked TopK against a pure-Python per-chunk reference, bytes per entry, spec
strings, the packed gather, and EF21/EControl on SPEC E2 with quantized values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import e2_problem, ef21_theory_step

import commopt.exchange as exchange_mod
from commopt.codecs import (DEFAULT_GROUP, WireFormat, dequantize, epsilon_sq_bound, pack_int4, quantize,
                            unpack_int4)
from commopt.compressors import RandK, ScaledRandK, TopK, make_compressor
from commopt.exchange import Exchange, ordered_sum
from commopt.feedback import EF14, EF21, EControl, make_feedback
from commopt.round import compress
from commopt.simulate import simulate

pytestmark = pytest.mark.timeout(300)

BITS = {"int8": 8, "int4": 4}


def _inputs(k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """float64 test vectors: Gaussian, heavy-tailed (Student-t, df 1.5), ties, one spike, zeros, tiny."""
    rng = np.random.default_rng(seed + 7 * k)
    spike = np.zeros(k)
    spike[k // 2] = -3.0
    return {
        "gaussian": torch.from_numpy(rng.standard_normal(k)),
        "student_t": torch.from_numpy(rng.standard_t(1.5, size=k)),
        "ties": torch.from_numpy(rng.integers(-3, 4, size=k).astype(np.float64) * 0.75),
        "one_spike": torch.from_numpy(spike),
        "zeros": torch.zeros(k, dtype=torch.float64),
        "tiny": torch.from_numpy(rng.standard_normal(k) * 1e-20),
    }


# -- NumPy references -------------------------------------------------------------------------------------


def np_absmax(v: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes, decoded float32) of symmetric absmax round-half-to-even per group, float64 arithmetic with
    an fp32 scale per group (SPEC §9), written independently of commopt.codecs."""
    q = 2 ** (bits - 1) - 1
    v = np.asarray(v, dtype=np.float64)
    codes = np.zeros(v.size)
    dec = np.zeros(v.size, dtype=np.float32)
    for start in range(0, v.size, group):
        g = v[start:start + group]
        s = np.float32(np.abs(g).max() / q)
        c = np.clip(np.rint(g / np.float64(s)), -q, q) if s > 0 else np.zeros(g.size)
        codes[start:start + group] = c
        dec[start:start + group] = c.astype(np.float32) * s
    return codes, dec


def np_bf16(v: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 (round to nearest, ties to even) as float32, by bit arithmetic (finite input)."""
    u = np.asarray(v, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


# -- round trips --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", ["int8", "int4"])
@pytest.mark.parametrize("k", [1, 7, 16, 17, 255, 256, 257, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_integer_codec_matches_numpy_reference(values, k, dtype):
    G = DEFAULT_GROUP[values]
    fmt = WireFormat(values=values)
    for kind, v in _inputs(k).items():
        v = v.to(dtype)
        codes, scales = quantize(v, BITS[values], G)
        want_codes, want = np_absmax(v.double().numpy(), BITS[values], G)
        assert np.array_equal(codes.numpy().astype(np.float64), want_codes), kind
        assert scales.dtype == torch.float32 and scales.numel() == -(-k // G)
        got = fmt.roundtrip_values(v)
        assert got.dtype == dtype
        assert np.array_equal(got.to(torch.float32).numpy(), want), kind
        # and through the bytes of a whole message
        assert torch.equal(fmt.decode_values(fmt.encode_values(v), k, dtype), got)


@pytest.mark.parametrize("G", [1, 3, 64])
def test_integer_codec_other_group_sizes(G):
    v = _inputs(200)["student_t"]
    for values in ("int8", "int4"):
        fmt = WireFormat(values=values, group=G)
        assert fmt.G == G
        _, want = np_absmax(v.numpy(), BITS[values], G)
        assert np.array_equal(fmt.roundtrip_values(v).to(torch.float32).numpy(), want)
        assert fmt.value_bytes(200, torch.float32) == (200 if values == "int8" else 100) + 4 * (-(-200 // G))


def test_round_half_to_even():
    # one group, absmax 127 (int8) / 7 (int4): the scale is exactly 1 and the codes are the rounded values
    v = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.4999, 3.5001], dtype=torch.float64)
    codes, scales = quantize(v, 8, 256)
    assert float(scales[0]) == 1.0
    assert codes.tolist() == [127, 0, 2, 2, 0, -2, -2, 3, 4]
    w = torch.tensor([7.0, 0.5, 1.5, 2.5, -3.5, -6.5], dtype=torch.float64)
    codes4, _ = quantize(w, 4, 16)
    assert codes4.tolist() == [7, 0, 2, 2, -4, -6]


def test_int4_packing_round_trip():
    for k in (1, 2, 15, 16, 33):
        codes = torch.tensor([(j % 16) - 8 for j in range(k)], dtype=torch.int8)
        packed = pack_int4(codes)
        assert packed.dtype == torch.uint8 and packed.numel() == (k + 1) // 2
        assert torch.equal(unpack_int4(packed, k), codes)
    # low nibble first, two's complement
    assert pack_int4(torch.tensor([1, -1], dtype=torch.int8)).tolist() == [0xF1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_float_and_bf16_codecs(dtype):
    v = _inputs(101)["student_t"].to(dtype)
    assert torch.equal(WireFormat(chunk=8).roundtrip_values(v), v)                  # float: unchanged
    got = WireFormat(values="bf16").roundtrip_values(v)
    assert got.dtype == dtype
    assert torch.equal(got, v.to(torch.bfloat16).to(dtype))
    if dtype != torch.float64:  # exactly float32 values: the bit-arithmetic reference applies
        assert np.array_equal(got.to(torch.float32).numpy(), np_bf16(v.to(torch.float32).numpy()))


def test_dequantize_is_the_decoder():
    v = _inputs(40)["gaussian"]
    codes, scales = quantize(v, 8, 16)
    assert torch.equal(dequantize(codes, scales, 16, torch.float64), WireFormat(values="int8", group=16).roundtrip_values(v))


# -- the SPEC §9 error bound and the contractivity of Q∘C -----------------------------------------------------


def test_epsilon_bound_values():
    assert epsilon_sq_bound("int8") == pytest.approx(256 / (4 * 127 ** 2))
    assert epsilon_sq_bound("int8") <= 0.004
    assert epsilon_sq_bound("int4") == pytest.approx(16 / (4 * 49)) and epsilon_sq_bound("int4") <= 0.082
    assert epsilon_sq_bound("float") == 0.0 and epsilon_sq_bound("bf16") == 2.0 ** -16
    assert epsilon_sq_bound("int8", 16) == pytest.approx(16 / (4 * 127 ** 2))


@pytest.mark.parametrize("values", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("k", [1, 5, 16, 300, 4097])
def test_relative_quantization_error_within_spec_bound(values, k):
    eps2 = epsilon_sq_bound(values)
    fmt = WireFormat(values=values)
    for seed in range(3):
        for kind, v in _inputs(k, seed).items():
            if kind == "zeros":
                continue
            for dtype in (torch.float32, torch.float64):
                x = v.to(dtype)
                err = float(((fmt.roundtrip_values(x).double() - x.double()) ** 2).sum())
                assert err <= eps2 * float((x.double() ** 2).sum()) * (1 + 1e-6), (kind, dtype)


def test_worst_case_group_is_close_to_the_bound():
    # one large value and G − 1 values exactly half a step off the grid: the error approaches G/(4q²)·a²
    q, G = 7, 16
    v = torch.full((G,), 0.5, dtype=torch.float64)
    v[0] = 7.0
    err = float(((WireFormat(values="int4").roundtrip_values(v) - v) ** 2).sum())
    assert err == pytest.approx((G - 1) * 0.25)
    assert err <= epsilon_sq_bound("int4") * float((v ** 2).sum())


def _compressors_for_contractivity():
    out = []
    for values in ("float", "bf16", "int8", "int4"):
        out.append(TopK(ratio=0.05, values=values))
        out.append(TopK(ratio=0.05, chunk=64, values=values))
        out.append(TopK(ratio=0.3, chunk=10, values=values))
    return out


@pytest.mark.parametrize("comp", _compressors_for_contractivity(), ids=repr)
@pytest.mark.parametrize("d", [50, 999, 4096])
def test_quantized_topk_is_contractive_with_delta_times_one_minus_eps2(comp, d):
    """‖x − Q(C(x))‖² = ‖x − C(x)‖² + ‖C(x) − Q(C(x))‖² ≤ (1 − (1 − ε²)δ)‖x‖², δ = min over chunks k_c/c."""
    eps2 = epsilon_sq_bound(comp.wire.values, comp.wire.group)
    c = comp.wire.chunk
    if c is None:
        delta = comp.num_selected(d) / d
    else:
        sizes = [min(c, d - s) for s in range(0, d, c)]
        delta = min(max(1, math.floor(comp.ratio * m)) / m for m in sizes)
    plain = TopK(ratio=comp.ratio, chunk=c)
    for seed in range(4):
        for kind, x in _inputs(d, seed).items():
            if kind == "zeros":
                continue
            qc = comp.dense(x)
            cx = plain.dense(x)
            lhs = float(((x - qc) ** 2).sum())
            x2 = float((x ** 2).sum())
            assert lhs <= (1 - (1 - eps2) * delta) * x2 * (1 + 1e-9) + 1e-300, (kind, lhs / x2)
            pyth = float(((x - cx) ** 2).sum()) + float(((cx - qc) ** 2).sum())
            assert lhs == pytest.approx(pyth, rel=1e-9, abs=1e-300)


# -- NaN / inf poison ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", ["int8", "int4"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 1e300])
@pytest.mark.parametrize("where", [0, 17, 299])
def test_one_non_finite_value_poisons_the_whole_integer_message(values, bad, where):
    v = _inputs(300)["gaussian"].clone()
    v[where] = bad
    fmt = WireFormat(values=values)
    got = fmt.roundtrip_values(v)
    assert torch.isnan(got).all()
    packed = fmt.pack(torch.arange(300), v, 1000)
    assert torch.isnan(packed.decode()[1]).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e300])
def test_bf16_keeps_non_finite_values_non_finite(bad):
    v = _inputs(50)["gaussian"].clone()
    v[7] = bad
    got = WireFormat(values="bf16").roundtrip_values(v)
    assert not torch.isfinite(got[7]) and torch.isfinite(got[:7]).all()


@pytest.mark.parametrize("spec", ["topk:0.1,values=int8", "topk:0.1,chunk=16,values=int4", "topk:0.1,values=bf16",
                                  "topk:0.1,chunk=16", "randk:0.1,values=bf16"])
@pytest.mark.parametrize("rule", ["ef14", "ef21", "econtrol"])
def test_round_poisons_a_non_finite_gradient_through_the_codec(spec, rule):
    comp, fb = make_compressor(spec), make_feedback(rule)
    d = 200
    g = _inputs(d)["gaussian"].clone()
    state = fb.init(g, g.clone())
    g[3] = float("nan")
    k = comp.num_selected(d)
    out = compress(comp, fb, state, g, k, 5, 1)
    assert torch.isnan(out.vals).all() and torch.isnan(out.own).all()
    if out.packed is not None:
        assert torch.isnan(out.packed.decode()[1]).all()  # what the other ranks decode


# -- chunked TopK ------------------------------------------------------------------------------------------------


def py_chunked_topk(x: list[float], chunk: int, ratio: float) -> list[int]:
    """Per chunk: the max(1, ⌊ratio·len⌋) largest |x|, NaN above inf, ties to the lowest index (pure Python)."""
    out = []
    for start in range(0, len(x), chunk):
        part = x[start:start + chunk]
        kc = max(1, math.floor(ratio * len(part)))

        def key(j: int) -> tuple:
            v = part[j]
            return (0 if math.isnan(v) else 1, -abs(v) if not math.isnan(v) else 0.0, j)

        out += sorted(start + j for j in sorted(range(len(part)), key=key)[:kc])
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return a.dtype == b.dtype and torch.equal(a.view(ints[a.element_size()]), b.view(ints[b.element_size()]))


def _chunk_vectors(d: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(d, generator=gen)
    ties = torch.randint(-2, 3, (d,), generator=gen).float()
    nan = x.clone()
    nan[:: max(1, d // 5)] = float("nan")
    nan[1::7] = float("inf")
    nan[2::11] = -float("inf")
    spiky = x.clone()
    spiky[d // 2] = -1e30
    return {"gauss": x, "ties": ties, "nan_inf": nan, "zeros": torch.zeros(d), "all_equal": torch.full((d,), -1.5),
            "spiky": spiky}


@pytest.mark.parametrize("d,chunk,ratio", [(1000, 100, 0.05), (1000, 64, 0.05), (1000, 64, 0.01), (50, 64, 0.1),
                                           (130, 64, 0.3), (129, 64, 0.5), (7, 2, 0.5), (4096, 4096, 0.01),
                                           (5000, 256, 1.0), (300, 16, 0.99), (70_000, 65536, 0.001)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_chunked_topk_matches_per_chunk_python_reference(d, chunk, ratio, dtype):
    comp = TopK(ratio=ratio, chunk=chunk)
    k = comp.num_selected(d)
    sizes = [min(chunk, d - s) for s in range(0, d, chunk)]
    assert k == sum(max(1, math.floor(ratio * m)) for m in sizes)
    for kind, x in _chunk_vectors(d).items():
        x = x.to(dtype)
        idx = comp.select(x, k, 0, 0)
        assert idx.dtype == torch.int64 and idx.numel() == k
        want = py_chunked_topk([float(v) for v in x.tolist()], chunk, ratio)
        assert idx.tolist() == want, kind
        # the message round trip: 16-bit chunk-local indices, the chunk known from the position
        packed, vals = comp.encode(idx, comp.values(x, idx), d)
        back_idx, back_vals = packed.decode()
        assert torch.equal(back_idx, idx) and _same_bits(back_vals, x[idx])


def test_chunked_topk_d_below_chunk_is_plain_topk():
    x = torch.randn(300)
    assert torch.equal(TopK(ratio=0.05, chunk=4096).select(x, 15, 0, 0), TopK(ratio=0.05).select(x, 15, 0, 0))
    assert TopK(ratio=0.05, chunk=4096).num_selected(300) == TopK(ratio=0.05).num_selected(300)


def test_chunked_topk_k_is_fixed_and_other_k_is_refused():
    comp = TopK(ratio=0.01, chunk=4096)
    assert comp.num_selected(10 * 4096 + 100) == 10 * 40 + 1
    assert comp.num_selected(1) == 1
    x = torch.randn(5000)
    assert torch.equal(comp.select(x, 5000, 0, 0), torch.arange(5000))   # everything (dense round)
    with pytest.raises(ValueError, match="chunked TopK keeps"):
        comp.select(x, 100, 0, 0)


def test_chunk_local_indices_use_all_16_bits():
    d = 3 * 65536
    x = torch.zeros(d)
    x[65535] = 5.0
    x[65536 + 40000] = -7.0
    x[2 * 65536] = 1.0
    comp = TopK(ratio=1 / 65536, chunk=65536, values="int8")
    k = comp.num_selected(d)
    assert k == 3
    out = compress(comp, EF14(), {"e": torch.zeros(d)}, x, k, 0, 0)
    assert out.idx.tolist() == [65535, 65536 + 40000, 2 * 65536]
    assert out.packed.decode()[0].tolist() == out.idx.tolist()


# -- wire sizes --------------------------------------------------------------------------------------------------


def _ex(n: int) -> Exchange:
    ex = Exchange.__new__(Exchange)
    ex.group, ex.n = None, n
    return ex


@pytest.mark.parametrize("spec,per_entry", [
    ("topk:0.01,chunk=4096,values=int8", 2 + 1 + 4 / 256),
    ("topk:0.01,chunk=4096,values=int4", 2 + 0.5 + 4 / 16),
    ("topk:0.01,chunk=4096,values=bf16", 2 + 2),
    ("topk:0.01,chunk=4096", 2 + 4),
    ("topk:0.01,values=int8", 4 + 1 + 4 / 256),
    ("topk:0.01,values=bf16", 4 + 2),
    ("topk:0.01", 4 + 4),
])
def test_bytes_per_kept_entry(spec, per_entry):
    comp = make_compressor(spec)
    d = 4096 * 256  # 1 Mi values: k = 256·40 = 10,240 chunked (a multiple of every group size), 10,485 not
    k = comp.num_selected(d)
    assert k == (10240 if "chunk" in spec else 10485)
    x = torch.randn(d)
    idx = comp.select(x, k, 0, 0)
    packed, _ = comp.encode(idx, x[idx], d)
    real = packed.nbytes if packed is not None else k * 8
    assert real == comp.wire.nbytes(k, d, torch.float32)
    assert real / k == pytest.approx(per_entry, abs=4 / k)  # a ragged last scale group at most
    print(f"{spec}: {real / k:.4f} bytes per kept entry")
    for n in (2, 4, 8):
        assert _ex(n).message_bytes("gather", k, d, torch.float32, wire=comp.wire) == (n - 1) * real
    if spec.startswith("topk:0.01,chunk=4096,values=int8"):
        assert real / k <= 3.5  # SPEC §9: ≈ 3.0 bytes per entry, about 130× less than dense fp32
        assert 4 * d / real > 125


def test_message_sizes_with_ragged_groups_and_odd_k():
    comp = TopK(ratio=0.05, chunk=64, values="int4")
    d = 1000
    k = comp.num_selected(d)  # 15·3 + 2 = 47: odd, and not a multiple of G = 16
    assert k == 47
    x = torch.randn(d)
    idx = comp.select(x, k, 0, 0)
    packed, _ = comp.encode(idx, x[idx], d)
    assert packed.nbytes == comp.wire.nbytes(k, d, torch.float32) == 2 * 47 + 24 + 4 * 3


def test_default_wire_keeps_todays_bytes_and_kinds():
    ex = _ex(8)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for wire in (None, WireFormat(), TopK(ratio=0.01).wire):
            assert ex.message_bytes("gather", 100, 10_000, dtype, wire=wire) == ex.message_bytes("gather", 100, 10_000, dtype)
    # dense and shared exchanges carry floats whatever the codec
    w = TopK(ratio=0.01, chunk=256, values="int4").wire
    assert ex.message_bytes("dense", 10_000, 10_000, torch.float32, wire=w) == ex.message_bytes("dense", 10_000, 10_000, torch.float32)
    assert ex.message_bytes("shared", 100, 10_000, torch.float32, wire=RandK(ratio=0.01, values="bf16").wire) \
        == ex.message_bytes("shared", 100, 10_000, torch.float32)
    # float64 values without a chunk keep int64 indices only in today's format
    assert WireFormat(values="int8").index_dtype(100, torch.float64) == torch.int32
    assert WireFormat().index_dtype(100, torch.float64) == torch.int64
    assert WireFormat(chunk=8).index_dtype(100, torch.float64) == torch.int16


# -- the packed gather: every rank's row decoded and summed in rank order -------------------------------------------


@pytest.mark.parametrize("spec", ["topk:0.02,chunk=128,values=int8", "topk:0.02,values=int4", "topk:0.02,chunk=100"])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_packed_gather_sums_the_decoded_messages_in_rank_order(monkeypatch, spec, n):
    comp, fb = make_compressor(spec), EF21()
    d = 3000
    k = comp.num_selected(d)
    outs = []
    for r in range(n):
        g = torch.randn(d, generator=torch.Generator().manual_seed(r), dtype=torch.float64)
        outs.append(compress(comp, fb, {"w_i": torch.zeros(d, dtype=torch.float64), "w": torch.zeros(d, dtype=torch.float64)},
                             g, k, 3, 9))
    sizes = {o.packed.nbytes for o in outs}
    assert sizes == {comp.wire.nbytes(k, d, torch.float64)}

    def fake_all_gather(recv, send, group=None, async_op=False):  # the n ranks' rows, rank order
        recv.copy_(torch.cat([o.packed.data for o in outs]))
        return None

    monkeypatch.setattr(exchange_mod, "_all_gather_single", fake_all_gather)
    ex = _ex(n)
    _, finish = ex._launch("gather", outs[0].idx, outs[0].vals, d, torch.float64, None, outs[0].packed)
    got = finish()
    want = ordered_sum([(o.idx, o.vals) for o in outs], d, torch.float64)   # what commopt.simulate sums
    assert torch.equal(got, want)
    # the receive buffer is uint8: (n−1)/n of it comes from the others
    assert ex.message_bytes("gather", k, d, torch.float64, wire=comp.wire) == (n - 1) * outs[0].packed.nbytes


# -- the feedback rules see the dequantized message ----------------------------------------------------------------


@pytest.mark.parametrize("spec", ["topk:0.1,values=int4", "topk:0.1,chunk=16,values=int8", "randk:0.1,values=bf16"])
def test_ef14_feeds_back_the_quantization_error(spec):
    comp, fb = make_compressor(spec), EF14()
    d = 160
    g = _inputs(d)["student_t"]
    e = _inputs(d, 1)["gaussian"]
    k = comp.num_selected(d)
    out = compress(comp, fb, {"e": e}, g, k, 2, 4)
    p = e + g
    raw = p[out.idx]
    assert not torch.equal(out.own, raw)                       # quantized
    assert torch.equal(out.own, comp.wire.roundtrip_values(raw))
    total = ordered_sum([(out.idx, out.vals)], d, torch.float64)
    from commopt.round import conclude
    new, ok, est, mean = conclude(fb, {"e": e}, out, total, 1)
    want = p.clone()
    want[out.idx] -= out.own
    assert torch.equal(new["e"], want)                         # e ← p − Q(C(p))


# -- make_compressor and the configuration -----------------------------------------------------------------------


@pytest.mark.parametrize("spec,cls,attrs", [
    ("topk:0.01,chunk=4096,values=int8", TopK, dict(ratio=0.01, chunk=4096, values_codec="int8")),
    ("TopK:0.01, chunk=4096, values=INT4", TopK, dict(ratio=0.01, chunk=4096, values_codec="int4")),
    ("topk:0.05,values=bf16", TopK, dict(ratio=0.05, chunk=None, values_codec="bf16")),
    ("topk:k=7,values=int8,group=32", TopK, dict(k=7, chunk=None, values_codec="int8")),
    ("topk:0.1,chunk=2", TopK, dict(chunk=2, values_codec="float")),
    ("topk:0.1,chunk=65536", TopK, dict(chunk=65536)),
    ("randk:0.05,values=bf16", RandK, dict(ratio=0.05, values_codec="bf16", seed=0)),
    ("randk:k=3,seed=17", RandK, dict(k=3, seed=17, values_codec="float")),
    ("scaled_randk:0.1,values=float", ScaledRandK, dict(values_codec="float")),
])
def test_make_compressor_options(spec, cls, attrs):
    c = make_compressor(spec)
    assert type(c) is cls
    for name, value in attrs.items():
        assert getattr(c, name) == value, name
    again = make_compressor(c.spec())
    assert type(again) is cls and again.config() == c.config() and repr(again) == repr(c)


@pytest.mark.parametrize("spec,match", [
    ("topk:0.01,chunk=1", r"chunk must be an integer in \[2, 65536\]"),
    ("topk:0.01,chunk=65537", r"chunk must be an integer in \[2, 65536\]"),
    ("topk:0.01,chunk=0", "chunk"),
    ("topk:0.01,chunk=4.5", "chunk must be an integer"),
    ("topk:0.01,chunk=abc", "chunk must be an integer"),
    ("topk:k=5,chunk=16", "chunk= needs ratio="),
    ("topk:0.01,values=int9", "values must be one of 'float', 'bf16', 'int8', 'int4'"),
    ("randk:0.01,values=int8", "values must be one of 'float', 'bf16'"),
    ("randk:0.01,values=int4", "all-reduced"),
    ("topk:0.01,foo=1", "unknown option 'foo' for topk; known: chunk, values, group"),
    ("randk:0.01,chunk=16", "unknown option 'chunk' for randk"),
    ("topk:0.01,seed=3", "unknown option 'seed'"),
    ("topk:0.01,chunk=16,chunk=32", "given twice"),
    ("topk:chunk=16", "the ratio or k comes first"),
    ("topk:0.01,", "key=value"),
    ("topk:0.01,chunk", "key=value"),
    ("topk:0.01,chunk=", "key=value"),
    ("topk:0.01,group=16", "group= is the scale group"),
    ("topk:0.01,values=int8,group=0", "group must be an integer"),
    ("none:0.1,values=int8", "takes no argument"),
])
def test_make_compressor_option_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        make_compressor(spec)


@pytest.mark.parametrize("kwargs", [dict(ratio=0.1, chunk=True), dict(ratio=0.1, chunk=1.5), dict(ratio=0.1, values=8),
                                    dict(ratio=0.1, values="int8", group=True), dict(k=3, chunk=8)])
def test_topk_constructor_errors(kwargs):
    with pytest.raises(ValueError):
        TopK(**kwargs)


def test_randk_values_must_be_float_or_bf16():
    for bad in ("int8", "int4", "fp8", None):
        with pytest.raises(ValueError, match="'float', 'bf16'"):
            RandK(ratio=0.1, values=bad)
    assert RandK(ratio=0.1, values="bf16").values_codec == "bf16"


def test_config_keeps_old_keys_for_the_default_format():
    # configs and checkpoints from before SPEC §9 compare equal: no new keys unless the format changes
    assert TopK(ratio=0.01).config() == {"name": "topk", "ratio": 0.01, "k": None}
    assert TopK(ratio=0.01, chunk=None, values="float").config() == TopK(ratio=0.01).config()
    assert RandK(k=3, seed=2).config() == {"name": "randk", "ratio": None, "k": 3, "seed": 2}
    assert TopK(ratio=0.01, chunk=4096, values="int8").config() == {"name": "topk", "ratio": 0.01, "k": None,
                                                                   "chunk": 4096, "values": "int8"}
    assert TopK(ratio=0.01, values="int8").config() != TopK(ratio=0.01, values="int4").config()
    assert TopK(ratio=0.01, chunk=256).config() != TopK(ratio=0.01, chunk=512).config()
    assert repr(TopK(ratio=0.01, chunk=4096, values="int8")) == "TopK(ratio=0.01, chunk=4096, values='int8')"
    assert TopK(ratio=0.01, chunk=4096, values="int8").spec() == "topk:0.01,chunk=4096,values=int8"
    assert repr(RandK(ratio=0.1, seed=3, values="bf16")) == "RandK(ratio=0.1, seed=3, values='bf16')"
    assert TopK(k=1).spec() == "topk:k=1" and make_compressor(TopK(k=1).spec()).k == 1


# -- SPEC E2 with quantized values: EF21 and EControl still reach the exact optimum ------------------------------------


def _e2_torch(n: int = 10, d: int = 20):
    a, b, _, f, f_star = e2_problem(n=n, d=d)
    grads = [(lambda x, ai=float(ai), bi=torch.from_numpy(bi): ai * (ai * x - bi)) for ai, bi in zip(a, b)]
    return a, grads, f, f_star


@pytest.mark.parametrize("rule,spec", [("ef21", "topk:0.1,chunk=10,values=int8"), ("ef21", "topk:0.1,chunk=10,values=int4"),
                                       ("econtrol", "topk:k=1,values=int8"), ("econtrol", "topk:0.1,chunk=10,values=int4"),
                                       ("econtrol", "topk:0.05,chunk=20,values=bf16")])
def test_e2_ef21_and_econtrol_converge_with_quantized_values(spec, rule):
    a, grads, f, f_star = _e2_torch()
    comp = make_compressor(spec)
    d = 20
    delta = comp.num_selected(d) / d           # chunks of equal length here: δ = k_c/c = k/d
    eps2 = epsilon_sq_bound(comp.wire.values, comp.wire.group)
    lr = ef21_theory_step(a, (1 - eps2) * delta)
    fb = EF21() if rule == "ef21" else EControl(eta=delta)
    xs = simulate(grads, torch.zeros(d, dtype=torch.float64), lr, 1500, comp, fb, warmup=1)
    gap = f(xs[-1].numpy()) - f_star
    assert gap < 1e-8, f"{spec} {rule}: f - f* = {gap:.3e}"
    # and the quantization really happened (the iterates differ from the float run)
    plain = simulate(grads, torch.zeros(d, dtype=torch.float64), lr, 50, TopK(ratio=comp.ratio, k=comp.k,
                                                                              chunk=comp.wire.chunk), fb, warmup=1)
    assert not torch.equal(xs[50], plain[50])
