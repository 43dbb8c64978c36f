"""numba kernels == numpy reference kernels, integer for integer, over generated shapes and widths."""
import gc
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from quant.backends import get_backend
from quant.fixedpoint import OutputSpec, Requant
from quant.ops.add import AddRescale
from quant.ops import int8_gemm, packing
from quant.ops import conv as conv_module
from quant.ops.conv import STACKED_ELEMENTS, ConvGeometry
from quant.ops.packing import freeze
from quant.ops.pool import PoolGeometry
from quant.tensor import QParams

REF, FAST = get_backend("numpy"), get_backend("numba")
MODES = st.sampled_from(["half_even", "half_away"])
SEEDS = st.integers(0, 2 ** 32 - 1)


def ints(rng, shape, bits, narrow=False):
    lo = -(1 << (bits - 1)) + (1 if narrow else 0)
    return rng.integers(lo, 1 << (bits - 1), shape).astype(np.int8 if bits == 8 else np.int16)


def random_output_spec(rng, channels, wide):
    """A fused requantization to int8 (sometimes clamped like a ReLU) with a random rounding mode."""
    rq = Requant.from_real(rng.uniform(1e-7, 1e-3, channels), wide)
    zp = int(rng.integers(-128, 128))
    lo = zp if rng.random() < 0.3 else -128
    return OutputSpec(rq, zp, lo, 127, str(rng.choice(["half_even", "half_away"])), np.int8)


DEPTHWISE_LOOPS = ("planes", "channels last")


def depthwise_loop(loop: str):
    """Make every depthwise conv take one loop (quant.ops.conv picks by the size of the output planes) when it
    is prepared: a stored (frozen) layer keeps the loop of its first call, so pass writable weights."""
    return mock.patch.object(conv_module, "CHANNELS_LAST_MAX_OUTPUTS", 0 if loop == "planes" else 10 ** 9)


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 2, 3, "depthwise"]))
    cin = draw(st.integers(1, 4)) * (3 if groups == "depthwise" else groups)
    groups = cin if groups == "depthwise" else groups
    cout = groups * draw(st.integers(1, 3)) if groups != cin else cin
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    geometry = ConvGeometry((draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                            tuple(draw(st.integers(0, 2)) for _ in range(4)),
                            (draw(st.integers(1, 2)), draw(st.integers(1, 2))), groups)
    h = draw(st.integers(geometry.dilation[0] * (kh - 1) + 1, 12))
    w = draw(st.integers(geometry.dilation[1] * (kw - 1) + 1, 12))
    return (draw(st.integers(1, 3)), cin, h, w), (cout, cin // groups, kh, kw), geometry


@settings(max_examples=120, deadline=None)
@given(conv_cases(), st.sampled_from([8, 16]), st.sampled_from([8, 16]), SEEDS)
def test_conv(case, xbits, wbits, seed):
    x_shape, w_shape, geometry = case
    rng = np.random.default_rng(seed)
    x, w = ints(rng, x_shape, xbits), ints(rng, w_shape, wbits, narrow=True)
    zp = int(rng.integers(-128, 128)) if xbits == 8 else 0
    bias = rng.integers(-(1 << 20), 1 << 20, w_shape[0])
    expected = REF.conv(x, zp, w, bias, geometry)
    got = FAST.conv(x, zp, w, bias, geometry)
    assert got.dtype == np.int64 and np.array_equal(got, expected)
    spec = random_output_spec(rng, w_shape[0], xbits > 8 or wbits > 8)
    assert np.array_equal(FAST.conv(x, zp, w, bias, geometry, spec), REF.conv(x, zp, w, bias, geometry, spec))
    frozen = freeze(w.copy())  # a graph's stored weights: packed on the first call, reused on the second
    for _ in range(2):
        assert np.array_equal(FAST.conv(x, zp, frozen, bias, geometry, spec), REF.conv(x, zp, w, bias, geometry, spec))
    other = x.astype(np.int16) * 3 if xbits == 8 else (x // 256).astype(np.int8)  # same weights, other input type
    assert np.array_equal(FAST.conv(other, 0, frozen, bias, geometry), REF.conv(other, 0, w, bias, geometry))
    if geometry.groups == x_shape[1] == w_shape[0]:  # depthwise: both loops, whatever the planes' size
        for loop in DEPTHWISE_LOOPS:
            with depthwise_loop(loop):
                assert np.array_equal(FAST.conv(x, zp, w, bias, geometry), expected)
                assert np.array_equal(FAST.conv(x, zp, w, bias, geometry, spec), REF.conv(x, zp, w, bias, geometry, spec))


def test_conv_long_reduction_splits_exactly():
    """K = 2304 > 1032 forces the chunked float32 path; extreme values maximise every partial sum."""
    rng = np.random.default_rng(1)
    x = np.full((1, 256, 5, 5), -128, np.int8)
    w = np.full((4, 256, 3, 3), 127, np.int8)
    w[1] = -127
    w[2] = ints(rng, (256, 3, 3), 8, narrow=True)
    geometry = ConvGeometry(pads=(1, 1, 1, 1))
    assert np.array_equal(FAST.conv(x, 3, w, np.zeros(4), geometry), REF.conv(x, 3, w, np.zeros(4), geometry))


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_stacks_of_images_split_exactly(stride):
    """Planes of 40x40 stack two images per buffer (quant.ops.conv.STACKED_ELEMENTS): five images make
    stacks of 2, 2 and 1, the rows between stacked images are dropped, both rounding modes."""
    phase_side = 40 + 2 // stride  # 40 outputs a side, plus the taps' reach into the padded phase plane
    assert STACKED_ELEMENTS // phase_side ** 2 == 2
    rng = np.random.default_rng(stride)
    x, w = ints(rng, (5, 3, 40 * stride, 40 * stride), 8), ints(rng, (3, 1, 3, 3), 8, narrow=True)
    geometry = ConvGeometry((stride, stride), (1, 1, 1, 1), (1, 1), 3)
    bias = rng.integers(-1000, 1000, 3)
    assert np.array_equal(FAST.conv(x, 7, w, bias, geometry), REF.conv(x, 7, w, bias, geometry))
    for mode in ("half_even", "half_away"):
        spec = OutputSpec(Requant.from_real(rng.uniform(1e-4, 1e-3, 3), False), -5, -128, 127, mode, np.int8)
        assert np.array_equal(FAST.conv(x, 7, w, bias, geometry, spec), REF.conv(x, 7, w, bias, geometry, spec))


@pytest.mark.parametrize("loop", DEPTHWISE_LOOPS)
@pytest.mark.parametrize("stride, dilation, bits", [(1, 1, 8), (2, 1, 8), (1, 2, 8), (2, 2, 16), (3, 1, 16)])
def test_depthwise_nine_taps(stride, dilation, bits, loop):
    """3x3 depthwise kernels take a one-pass nine-tap loop in both layouts; every stride phase and dilation
    lands on the reference integers, in float32 (8-bit) and float64 (16-bit inputs), full-range values
    included; channel blocks (at least 32 channels) end partway through the 40 channels."""
    rng = np.random.default_rng(stride * 10 + dilation)
    x, w = ints(rng, (3, 40, 17, 13), bits), ints(rng, (40, 1, 3, 3), 8, narrow=True)
    x[0], w[0] = np.iinfo(x.dtype).min, 127  # extremes maximise the sums
    geometry = ConvGeometry((stride, stride), (2, 1, 1, 2), (dilation, dilation), 40)
    bias = rng.integers(-1000, 1000, 40)
    zp = 9 if bits == 8 else 0
    spec = random_output_spec(rng, 40, bits > 8)
    with depthwise_loop(loop):
        for images in (x[:1], x):
            assert np.array_equal(FAST.conv(images, zp, w, bias, geometry), REF.conv(images, zp, w, bias, geometry))
            assert np.array_equal(FAST.conv(images, zp, w, bias, geometry, spec),
                                  REF.conv(images, zp, w, bias, geometry, spec))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 1200), st.one_of(st.integers(1, 6), st.integers(90, 450)),
       st.sampled_from([8, 16]), st.sampled_from([8, 16]), SEEDS)
def test_linear(n, k, o, xbits, wbits, seed):
    """With few rows the fused GEMM also splits the outputs across threads (blocks of 96 or more, their
    number rounded to a multiple of the threads beyond 192 outputs: quant.ops.exact_gemm.gemm_plan)."""
    rng = np.random.default_rng(seed)
    x, w = ints(rng, (n, k), xbits), ints(rng, (o, k), wbits, narrow=True)
    zp = int(rng.integers(-128, 128)) if xbits == 8 else 0
    bias = rng.integers(-1000, 1000, o)
    assert np.array_equal(FAST.linear(x, zp, w, bias), REF.linear(x, zp, w, bias))
    spec = random_output_spec(rng, o, xbits > 8 or wbits > 8)
    assert np.array_equal(FAST.linear(x, zp, w, bias, spec), REF.linear(x, zp, w, bias, spec))
    frozen = freeze(w.copy())  # packed once, then reused; the zero point is applied per call
    for x_zp in (zp, 0):
        assert np.array_equal(FAST.linear(x, x_zp, frozen, bias, spec), REF.linear(x, x_zp, w, bias, spec))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.sampled_from([1, 5, 40, 1100]), st.integers(1, 70), st.integers(1, 5),
       st.sampled_from([8, 16]), st.sampled_from([8, 16]), SEEDS)
def test_pointwise_conv_tiles(n, k, space, o, xbits, wbits, seed):
    """The fused tiled GEMM of 1x1 convs: tiles cross image boundaries, K beyond float32's exact chunk."""
    rng = np.random.default_rng(seed)
    x, w = ints(rng, (n, k, space, 1), xbits), ints(rng, (o, k, 1, 1), wbits, narrow=True)
    if rng.random() < 0.2:  # extremes maximise every partial sum
        x[:], w[:] = np.iinfo(x.dtype).min, np.iinfo(w.dtype).max
    zp = int(rng.integers(-128, 128)) if xbits == 8 else 0
    bias = rng.integers(-(1 << 20), 1 << 20, o)
    geometry = ConvGeometry()
    assert np.array_equal(FAST.conv(x, zp, w, bias, geometry), REF.conv(x, zp, w, bias, geometry))
    spec = random_output_spec(rng, o, xbits > 8 or wbits > 8)
    assert np.array_equal(FAST.conv(x, zp, w, bias, geometry, spec), REF.conv(x, zp, w, bias, geometry, spec))


@settings(max_examples=80, deadline=None)
@given(st.sampled_from([8, 16]), MODES, SEEDS, st.booleans())
def test_add(bits, mode, seed, relu):
    rng = np.random.default_rng(seed)
    zp = (lambda: int(rng.integers(-128, 128))) if bits == 8 else (lambda: 0)
    params = [QParams(rng.uniform(1e-3, 1.0), zp(), bits) for _ in range(3)]
    rescale = AddRescale.from_params(*params)
    x1, x2 = ints(rng, (2, 3, 5, 4), bits), ints(rng, (2, 3, 5, 4), bits)
    lo = params[2].zero_point if relu else params[2].qmin
    dtype = params[2].dtype
    expected = REF.add(x1, x2, rescale, lo, params[2].qmax, mode, dtype)
    assert np.array_equal(FAST.add(x1, x2, rescale, lo, params[2].qmax, mode, dtype), expected)
    real = (x1.astype(float) - params[0].zero_point) * params[0].scale + (x2.astype(float) - params[1].zero_point) * params[1].scale
    ideal = np.clip(np.rint(real / params[2].scale) + params[2].zero_point, lo, params[2].qmax)
    assert np.abs(expected - ideal).max() <= 1  # within one step of the exact real-valued result


@st.composite
def pool_cases(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    pads = (draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1)), draw(st.integers(0, kh - 1)),
            draw(st.integers(0, kw - 1)))
    geometry = PoolGeometry((kh, kw), (draw(st.integers(1, 3)), draw(st.integers(1, 3))), pads, draw(st.booleans()))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(kh, 10)), draw(st.integers(kw, 10)))
    return shape, geometry


@settings(max_examples=100, deadline=None)
@given(pool_cases(), st.sampled_from([8, 16]), MODES, SEEDS)
def test_pools(case, bits, mode, seed):
    shape, geometry = case
    rng = np.random.default_rng(seed)
    x = ints(rng, shape, bits)
    zp = int(rng.integers(-128, 128)) if bits == 8 else 0
    assert np.array_equal(FAST.maxpool(x, geometry), REF.maxpool(x, geometry))
    assert np.array_equal(FAST.avgpool(x, zp, geometry, mode), REF.avgpool(x, zp, geometry, mode))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 40), st.integers(1, 9), st.integers(1, 9), st.sampled_from([8, 16]), MODES,
       SEEDS)
def test_global_pools(n, c, h, w, bits, mode, seed):
    """A window of the whole plane (GlobalAveragePool) takes its own reduction loop; extremes included."""
    rng = np.random.default_rng(seed)
    x = ints(rng, (n, c, h, w), bits)
    if rng.random() < 0.2:
        x[:] = np.iinfo(x.dtype).min
    zp = int(rng.integers(-128, 128)) if bits == 8 else 0
    whole = PoolGeometry((h, w))
    assert np.array_equal(FAST.maxpool(x, whole), REF.maxpool(x, whole))
    assert np.array_equal(FAST.avgpool(x, zp, whole, mode), REF.avgpool(x, zp, whole, mode))


def test_global_average_pool_rounds_by_mode():
    x = np.array([1, 2, 3, 4, 5, 6, 7, 9], np.int8).reshape(1, 1, 2, 4)  # mean 4.625 -> 5; and ties below
    whole = PoolGeometry((2, 4))
    assert REF.avgpool(x, 0, whole, "half_even")[0, 0, 0, 0] == 5
    tie = np.array([1, 2], np.int8).reshape(1, 1, 1, 2)  # mean 1.5
    assert REF.avgpool(tie, 0, PoolGeometry((1, 2)), "half_even")[0, 0, 0, 0] == 2
    tie = np.array([2, 3], np.int8).reshape(1, 1, 1, 2)  # mean 2.5
    assert REF.avgpool(tie, 0, PoolGeometry((1, 2)), "half_even")[0, 0, 0, 0] == 2
    assert REF.avgpool(tie, 0, PoolGeometry((1, 2)), "half_away")[0, 0, 0, 0] == 3
    for mode, expected in (("half_even", 2), ("half_away", 3)):
        assert FAST.avgpool(tie, 0, PoolGeometry((1, 2)), mode)[0, 0, 0, 0] == expected


@pytest.fixture(params=["int8 instructions", "float BLAS"])
def product_path(request, monkeypatch):
    """Run a test on each exact product path (ops/matmul.py): oneDNN's int32 GEMM, or chunked float BLAS."""
    if request.param == "float BLAS":
        monkeypatch.setattr(int8_gemm, "gemm_functions", lambda: None)
    elif int8_gemm.gemm_functions() is None:
        pytest.skip("no VNNI/AMX or no oneDNN here: the int8 instruction path is not used")
    return request.param


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 17), st.integers(int8_gemm.MIN_DEPTH, 1300), st.integers(1, 300), st.integers(1, 400),
       st.sampled_from([8, 16]), SEEDS)
def test_int8_products_on_both_paths(n, k, space, o, wbits, seed):
    """Pointwise convs and linear layers with int8 activations and int8 or int16 weights (the latter as two
    int8 products, high and low byte), extremes included (int16 saturation, the failure of int8
    instructions without VNNI, would show here, and so would a wrong high/low split), both rounding modes."""
    for path in ("int8 instructions", "float BLAS"):
        with pytest.MonkeyPatch.context() as patch:
            if path == "float BLAS":
                patch.setattr(int8_gemm, "gemm_functions", lambda: None)
            elif int8_gemm.gemm_functions() is None:
                continue
            rng = np.random.default_rng(seed)
            x, w = ints(rng, (n, k, space, 1), 8), ints(rng, (o, k, 1, 1), wbits, narrow=True)
            assert int8_gemm.usable(x.dtype, w.dtype, k) == (path == "int8 instructions")
            if rng.random() < 0.3:
                x[:], w[:] = -128, np.iinfo(w.dtype).max
                w[::2] = -np.iinfo(w.dtype).max
            zp, bias = int(rng.integers(-128, 128)), rng.integers(-(1 << 20), 1 << 20, o)
            spec = random_output_spec(rng, o, wbits > 8)
            geometry = ConvGeometry()
            assert np.array_equal(FAST.conv(x, zp, w, bias, geometry), REF.conv(x, zp, w, bias, geometry))
            assert np.array_equal(FAST.conv(x, zp, w, bias, geometry, spec), REF.conv(x, zp, w, bias, geometry, spec))
            flat_x, flat_w = x[:, :, 0, 0], w[:, :, 0, 0]
            expected = REF.linear(flat_x, zp, flat_w, bias, spec)
            assert np.array_equal(FAST.linear(flat_x, zp, flat_w, bias, spec), expected)


def test_im2col_conv_on_both_paths(product_path):
    """A 3x3 stride-2 conv (K = 4 * 9 = 36 terms): its im2col columns stay int8 on the int8 path."""
    rng = np.random.default_rng(3)
    x, w = ints(rng, (2, 4, 15, 11), 8), ints(rng, (40, 4, 3, 3), 8, narrow=True)
    x[0] = -128
    geometry = ConvGeometry((2, 2), (1, 1, 0, 1))
    bias = rng.integers(-1000, 1000, 40)
    spec = random_output_spec(rng, 40, False)
    assert np.array_equal(FAST.conv(x, 5, w, bias, geometry, spec), REF.conv(x, 5, w, bias, geometry, spec))
    assert np.array_equal(FAST.conv(x, 5, w, bias, geometry), REF.conv(x, 5, w, bias, geometry))


@pytest.mark.parametrize("kind", ["pointwise", "im2col", "depthwise", "linear"])
def test_prepared_calls_follow_their_inputs_and_free_with_the_weights(kind):
    """A stored layer's call is prepared once per input shape (quant.ops.packing.prepared): a new bias or
    output spec, or a bias edited in place, gives their integers, not the prepared ones; dropping the
    weights drops what was prepared for them (nothing in the cache keeps them alive)."""
    rng = np.random.default_rng(3)
    geometry = {"pointwise": ConvGeometry(), "im2col": ConvGeometry(pads=(1, 1, 1, 1)),
                "depthwise": ConvGeometry(pads=(1, 1, 1, 1), groups=40)}.get(kind)
    shapes = {"pointwise": ((1, 40, 4, 4), (24, 40, 1, 1)), "im2col": ((2, 40, 5, 5), (24, 40, 3, 3)),
              "depthwise": ((1, 40, 4, 4), (40, 1, 3, 3)), "linear": ((3, 40), (24, 40))}[kind]
    x, w = ints(rng, shapes[0], 8), freeze(ints(rng, shapes[1], 8, narrow=True))

    def both(bias, spec):
        if kind == "linear":
            return FAST.linear(x, 5, w, bias, spec), REF.linear(x, 5, w, bias, spec)
        return FAST.conv(x, 5, w, bias, geometry, spec), REF.conv(x, 5, w, bias, geometry, spec)

    before = set(packing._PACKED)
    spec = random_output_spec(rng, w.shape[0], False)
    bias = freeze(rng.integers(-1000, 1000, w.shape[0]))
    for new_bias, new_spec in [(bias, spec), (bias, spec), (freeze(bias + 7), spec),
                               (bias, random_output_spec(rng, w.shape[0], False)), (bias, None)]:
        got, expected = both(new_bias, new_spec)
        assert np.array_equal(got, expected)
    editable = bias.copy()
    for _ in range(2):
        editable += 100
        got, expected = both(editable, spec)
        assert np.array_equal(got, expected)
    ours = set(packing._PACKED) - before
    assert ours
    del w
    gc.collect()
    assert not ours & set(packing._PACKED)  # (other tests' entries may come and go meanwhile)
