"""The requantization arithmetic against exact rational arithmetic, and its numba twin against numpy."""
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from quant.fixedpoint import (Requant, quantize_multiplier, requantize, requantize_numba, round_divide,
                              round_shift)


def exact_round(value: Fraction, mode: str) -> int:
    floor = value.numerator // value.denominator
    rest = value - floor
    if rest > Fraction(1, 2):
        return floor + 1
    if rest < Fraction(1, 2):
        return floor
    if mode == "half_even":
        return floor + (floor % 2)
    return floor + 1 if value > 0 else floor


@given(st.floats(min_value=1e-9, max_value=1e3), st.sampled_from([15, 31]))
def test_multiplier_keeps_its_significant_bits(real, bits):
    mantissa, shift = quantize_multiplier(np.array([real]), bits)
    assert (1 << (bits - 1)) <= mantissa[0] <= (1 << bits)
    assert abs(mantissa[0] / 2.0 ** shift[0] - real) <= real * 2.0 ** -(bits - 1)


@given(st.integers(-(1 << 40), 1 << 40), st.integers(1, 40), st.sampled_from(["half_even", "half_away"]))
def test_round_shift_is_exact_rounding(product, shift, mode):
    got = round_shift(np.array([product], np.int64), np.array([shift]), mode)[0]
    assert got == exact_round(Fraction(product, 1 << shift), mode)


@given(st.integers(-(1 << 40), 1 << 40), st.integers(1, 10_000), st.sampled_from(["half_even", "half_away"]))
def test_round_divide_is_exact_rounding(numerator, denominator, mode):
    assert round_divide(np.array([numerator]), denominator, mode)[0] == exact_round(Fraction(numerator, denominator), mode)


def test_ties_follow_the_mode():
    product = np.array([5, -5, 3, -3, 7], np.int64)  # x / 2 = 2.5, -2.5, 1.5, -1.5, 3.5
    assert round_shift(product, np.array(1), "half_even").tolist() == [2, -2, 2, -2, 4]
    assert round_shift(product, np.array(1), "half_away").tolist() == [3, -3, 2, -2, 4]


def test_bad_multiplier_is_refused():
    with pytest.raises(ValueError, match="finite and > 0"):
        quantize_multiplier(np.array([0.0]))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 7), st.booleans(), st.booleans(),
       st.sampled_from(["half_even", "half_away"]), st.sampled_from([8, 16]), st.integers(0, 2 ** 32 - 1))
def test_requantize_numba_matches_numpy(n, c, s, per_channel, wide, mode, out_bits, seed):
    rng = np.random.default_rng(seed)
    limit = 1 << (46 if wide else 30)
    acc = rng.integers(-limit, limit, (n, c, s), dtype=np.int64)
    scales = rng.uniform(1e-9 if wide else 1e-6, 1e-2, c if per_channel else 1)
    rq = Requant.from_real(scales, wide)
    qmin, qmax = -(1 << (out_bits - 1)), (1 << (out_bits - 1)) - 1
    zp = int(rng.integers(qmin, qmax)) if out_bits == 8 else 0
    expected = requantize(acc, rq, zp, qmin, qmax, mode)
    assert np.array_equal(requantize_numba(acc, rq, zp, qmin, qmax, mode), expected)
    assert expected.min() >= qmin and expected.max() <= qmax


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 7), st.booleans(),
       st.sampled_from(["half_even", "half_away"]), st.sampled_from([np.float32, np.float64]), st.integers(0, 2 ** 32 - 1))
def test_float_accumulators_plus_offset_requantize_exactly(n, c, s, per_channel, mode, acc_type, seed):
    """The fast kernels hand over exact integers in floats plus a per-channel offset (bias - x_zp * sum w);
    the result must equal requantizing the integer sum."""
    rng = np.random.default_rng(seed)
    exact = 1 << (24 if acc_type == np.float32 else 46)
    acc = rng.integers(-exact, exact, (n, c, s), dtype=np.int64)
    offset = rng.integers(-(1 << 31), 1 << 31, c, dtype=np.int64)
    rq = Requant.from_real(rng.uniform(1e-7, 1e-2, c if per_channel else 1), acc_type == np.float64)
    expected = requantize(acc + offset.reshape(1, c, 1), rq, -3, -128, 127, mode)
    assert np.array_equal(requantize_numba(acc.astype(acc_type), rq, -3, -128, 127, mode, offset=offset), expected)
