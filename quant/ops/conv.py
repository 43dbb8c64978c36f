"""Quantized 2-D convolution (groups, depthwise, stride, padding, dilation) and its kernels.

Integer semantics (TFLite's): ``acc[n, o, y, x] = bias[o] + sum (x_q - x_zp) * w_q`` over the receptive
field, in a 32-bit accumulator (64-bit when an operand is 16-bit), with padding at the real value 0
(i.e. the integer ``x_zp``). The accumulator is then requantized to the output (see fixedpoint).

The numba kernel computes ``sum x_q * w_q - x_zp * sum w_q`` so that the heavy part is a product of raw
int8 values, which float32 BLAS computes exactly (see exact_gemm); depthwise convolutions, which are
memory-bound, run as a direct numba loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from ..fixedpoint import OutputSpec, kernel_arguments, lane_params, store_accumulators, store_lanes
from .base import WeightedNode
from .exact_gemm import FLOAT32_EXACT, largest_magnitude, zero_point_offset
from . import int8_gemm
from .matmul import prepare_matmul
from .packing import packed, prepared


@dataclass(frozen=True)
class ConvGeometry:
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # ONNX order: top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def output_hw(self, h: int, w: int, kh: int, kw: int) -> tuple[int, int]:
        (sh, sw), (dh, dw), (pt, pl, pb, pr) = self.stride, self.dilation, self.pads
        ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
        wo = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
        if ho < 1 or wo < 1:
            raise ValueError(f"kernel {kh}x{kw} with dilation {self.dilation} does not fit input {h}x{w} + padding {self.pads}")
        return ho, wo


def check_conv_shapes(x: np.ndarray, w: np.ndarray, geometry: ConvGeometry) -> None:
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"conv expects NCHW input and OIHW weights, got {x.shape} and {w.shape}")
    groups = geometry.groups
    if x.shape[1] != w.shape[1] * groups or w.shape[0] % groups:
        raise ValueError(f"conv input has {x.shape[1]} channels but weights {w.shape} with groups={groups} "
                         f"expect {w.shape[1] * groups}")


def conv_reference(x: np.ndarray, x_zp: int, w: np.ndarray, bias: np.ndarray, geometry: ConvGeometry,
                   out: OutputSpec | None = None) -> np.ndarray:
    """The definition: int64 accumulators, loops over kernel taps, integer einsum per group."""
    check_conv_shapes(x, w, geometry)
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = geometry.stride, geometry.dilation, geometry.pads
    g = geometry.groups
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    ho, wo = geometry.output_hw(h, wd, kh, kw)
    centered = np.pad(x.astype(np.int64) - x_zp, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    grouped = centered.reshape(n, g, cg, h + pt + pb, wd + pl + pr)
    weights = w.astype(np.int64).reshape(g, o // g, cg, kh, kw)
    acc = np.zeros((n, g, o // g, ho, wo), dtype=np.int64)
    for i in range(kh):
        for j in range(kw):
            taps = grouped[:, :, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
            acc += np.einsum("ngchw,goc->ngohw", taps, weights[:, :, :, i, j])
    acc = acc.reshape(n, o, ho, wo) + bias.astype(np.int64).reshape(1, o, 1, 1)
    return acc if out is None else out.apply(acc)


@numba.njit(cache=True, nogil=True, inline="always")
def _at(i):
    """An index numba need not wrap around: unsigned, so loops indexing ``base + i`` vectorize."""
    return np.uintp(i)


@numba.njit(cache=True, nogil=True)
def _phase_ranges(pad, size, stride, count):
    """For each phase ``p < stride``: the first and past-the-last index ``r < count`` whose padded position
    ``r * stride + p`` falls inside the input (``pad <= position < pad + size``)."""
    ranges = np.zeros((stride, 2), dtype=np.int64)
    for p in range(stride):
        first = max(0, (pad - p + stride - 1) // stride)
        ranges[p, 0], ranges[p, 1] = first, max(first, min(count, (pad + size - 1 - p) // stride + 1))
    return ranges


@numba.njit(cache=True, nogil=True)
def _pad_plane(plane, pt, pl, sh, sw, wq, rows, cols, row0, xp):
    """``xp[p * sw + q, (row0 + r) * wq + k]`` = the plane padded, at row ``r * sh + p`` and column
    ``k * sw + q``, for the rows and columns inside the input per phase (``rows``, ``cols``:
    :func:`_phase_ranges`); the caller has filled ``xp`` with the real zero.

    Rows and columns are split by phase (``p = row % sh``, ``q = column % sw``) so that, for any stride, the
    inputs one kernel tap reads for consecutive outputs are consecutive in memory (see
    :func:`_depthwise_kernel`).
    """
    for p in range(sh):
        for r in range(rows[p, 0], rows[p, 1]):
            src = plane[r * sh + p - pt]
            for q in range(sw):
                dst, base = xp[p * sw + q], (row0 + r) * wq
                if sw == 1:  # contiguous int -> float copy: vectorizes
                    for k in range(cols[0, 0], cols[0, 1]):
                        dst[_at(base + k)] = src[_at(k - pl)]
                else:
                    for k in range(cols[q, 0], cols[q, 1]):
                        dst[_at(base + k)] = src[_at(k * sw + q - pl)]


@numba.njit(cache=True, nogil=True)
def _nine_taps(xp, tap_phase, tap_start, wc, span, acc):
    """``acc[:span]`` = the 3x3 kernel's nine tap products summed in one pass: each output is written once
    instead of read and written nine times (the general loop in :func:`_depthwise_kernel`, tap by tap).
    The sums are exact integers in floats, so their order does not change them."""
    t0, t1, t2 = xp[tap_phase[0]][tap_start[0]:], xp[tap_phase[1]][tap_start[1]:], xp[tap_phase[2]][tap_start[2]:]
    t3, t4, t5 = xp[tap_phase[3]][tap_start[3]:], xp[tap_phase[4]][tap_start[4]:], xp[tap_phase[5]][tap_start[5]:]
    t6, t7, t8 = xp[tap_phase[6]][tap_start[6]:], xp[tap_phase[7]][tap_start[7]:], xp[tap_phase[8]][tap_start[8]:]
    w0, w1, w2, w3, w4, w5, w6, w7, w8 = wc[0], wc[1], wc[2], wc[3], wc[4], wc[5], wc[6], wc[7], wc[8]
    for q in range(span):
        i = _at(q)
        acc[i] = (t0[i] * w0 + t1[i] * w1 + t2[i] * w2 + t3[i] * w3 + t4[i] * w4 + t5[i] * w5
                  + t6[i] * w6 + t7[i] * w7 + t8[i] * w8)


@numba.njit(cache=True, nogil=True, parallel=True)
def _depthwise_kernel(x, x_zp, w, kh, kw, offset, sh, sw, pt, pl, dh, dw, hq, wq, f32, mantissa, shift, zero_point,
                      qmin, qmax, half_even, requantize_out, stack, stages, out):
    """Depthwise conv, one channel of ``stack`` images at a time, each of ``n_tasks`` tasks reusing its buffers.

    ``w`` is (channels, kh * kw), in a float type in which sums of kh*kw products are exact (see exact_gemm).
    The images' planes of one channel are padded into one buffer of that type, one under the other, split
    into stride phases of ``hq`` rows of pitch ``wq`` (see :func:`_pad_plane`). Each tap then adds ``w[c, tap] * phase``
    shifted by the tap's offset over all the stacked outputs in one contiguous loop, output rows laid out at
    pitch ``wq`` too (the few columns past the output width, and the rows between two images, are computed
    and dropped): long contiguous float multiply-adds vectorize, and numba's int8 ones (promoted to int64)
    do not. A strided convolution reads only the outputs it keeps; stacking makes the loops of small planes
    (7x7) long enough to vectorize. Then adds ``offset`` (bias - x_zp * sum w) and, if asked, requantizes,
    in one long pass into the task's row of ``stages`` (int32, or int64 accumulators), whose output rows
    are then copied out.
    """
    n_batch, n_chan, h, wd = x.shape
    ho, wo = out.shape[2], out.shape[3]
    rows, cols = _phase_ranges(pt, h, sh, hq), _phase_ranges(pl, wd, sw, wq)
    tap_phase, tap_start = np.empty(kh * kw, np.int64), np.empty(kh * kw, np.int64)
    for i in range(kh):
        for j in range(kw):
            tap_phase[i * kw + j] = ((i * dh) % sh) * sw + (j * dw) % sw
            tap_start[i * kw + j] = ((i * dh) // sh) * wq + (j * dw) // sw
    per_channel = f32.shape[0] > 1
    n_stacks = (n_batch + stack - 1) // stack
    units, n_tasks = n_chan * n_stacks, stages.shape[0]
    for t in numba.prange(n_tasks):
        xp = np.empty((sh * sw, stack * hq * wq), dtype=w.dtype)
        acc, stage = np.empty(stack * hq * wq, dtype=w.dtype), stages[t]
        for u in range(t * units // n_tasks, (t + 1) * units // n_tasks):
            c, b0 = u // n_stacks, (u % n_stacks) * stack
            images = min(stack, n_batch - b0)
            xp[:] = x_zp
            for i in range(images):
                _pad_plane(x[b0 + i, c], pt, pl, sh, sw, wq, rows, cols, i * hq, xp)
            span = ((images - 1) * hq + ho - 1) * wq + wo
            if kh * kw == 9:
                _nine_taps(xp, tap_phase, tap_start, w[c], span, acc)
            else:
                acc[:span] = 0
                for tap in range(kh * kw):
                    taps, wij, start = xp[tap_phase[tap]], w[c, tap], tap_start[tap]
                    for q in range(span):
                        acc[q] += taps[_at(start + q)] * wij
            k = c if per_channel else 0
            store_accumulators(acc, span, offset[c], f32[k], mantissa[k], shift[k], zero_point, qmin, qmax, half_even,
                               requantize_out, stage)
            for i in range(images):
                dst = out[b0 + i, c]
                for oy in range(ho):
                    row = (i * hq + oy) * wq
                    for ox in range(wo):
                        dst[oy, ox] = stage[_at(row + ox)]


@numba.njit(cache=True, nogil=True)
def _nine_lanes(xp, start, cb, row, col, wb, lane):
    """``lane[:cb]`` = a 3x3 kernel's nine products summed, channel by channel, the kernel's top-left tap at
    ``xp[start]``, its next column ``col`` and next row ``row`` elements on, and ``wb[tap * cb + c]`` the
    block's weights: one pass, as :func:`_nine_taps` does for planes."""
    a0, a1, a2 = start, start + col, start + 2 * col
    b0, b1, b2 = a0 + row, a1 + row, a2 + row
    e0, e1, e2 = b0 + row, b1 + row, b2 + row
    for c in range(cb):
        lane[c] = (xp[_at(a0 + c)] * wb[c] + xp[_at(a1 + c)] * wb[_at(cb + c)] + xp[_at(a2 + c)] * wb[_at(2 * cb + c)]
                   + xp[_at(b0 + c)] * wb[_at(3 * cb + c)] + xp[_at(b1 + c)] * wb[_at(4 * cb + c)]
                   + xp[_at(b2 + c)] * wb[_at(5 * cb + c)] + xp[_at(e0 + c)] * wb[_at(6 * cb + c)]
                   + xp[_at(e1 + c)] * wb[_at(7 * cb + c)] + xp[_at(e2 + c)] * wb[_at(8 * cb + c)])


@numba.njit(cache=True, nogil=True, parallel=True)
def _depthwise_channels_last_kernel(x, x_zp, wt, kh, kw, offset, sh, sw, pt, pl, dh, dw, f32, mantissa, shift,
                                    zero_point, qmin, qmax, half_even, requantize_out, block, out):
    """Depthwise conv of small planes, ``block`` channels of one image at a time, channels innermost.

    On a 4x4 output plane the plane-by-plane loops of :func:`_depthwise_kernel` are a few dozen elements
    long, and their fixed cost per channel is most of the work.
    Here the block's planes are transposed into one padded buffer ``xp[position, channel]`` (``wt`` is
    ``[tap, channel]``), so every output position is a multiply-add over the block's channels, contiguous
    in memory, for any stride or dilation (a tap only moves the buffer row), and is requantized across the
    channels with their own multipliers. Sums are exact in ``wt``'s float type, as there.
    """
    n_batch, n_chan, h, wd = x.shape
    ho, wo = out.shape[2], out.shape[3]
    hp, wp = (ho - 1) * sh + (kh - 1) * dh + 1, (wo - 1) * sw + (kw - 1) * dw + 1  # padded extent read
    n_blocks = (n_chan + block - 1) // block
    flat = x.reshape(-1)
    for t in numba.prange(n_batch * n_blocks):
        b, c0 = t // n_blocks, (t % n_blocks) * block
        cb = min(n_chan, c0 + block) - c0
        xp = np.full(hp * wp * cb, x_zp, dtype=wt.dtype)
        for iy in range(max(0, -pt), min(h, hp - pt)):
            for ix in range(max(0, -pl), min(wd, wp - pl)):
                dst, src = ((iy + pt) * wp + ix + pl) * cb, ((b * n_chan + c0) * h + iy) * wd + ix
                for c in range(cb):
                    xp[_at(dst + c)] = flat[_at(src + c * h * wd)]
        wb = np.empty(kh * kw * cb, dtype=wt.dtype)  # the block's weights, [tap, channel]
        for tap in range(kh * kw):
            wb[tap * cb:(tap + 1) * cb] = wt[tap * n_chan + c0:tap * n_chan + c0 + cb]
        lane, stage = np.empty(cb, dtype=wt.dtype), np.empty(cb, dtype=out.dtype)
        params = lane_params(c0, cb, offset, f32, mantissa, shift)
        for oy in range(ho):
            for ox in range(wo):
                start = (oy * sh * wp + ox * sw) * cb
                if kh * kw == 9:
                    _nine_lanes(xp, start, cb, dh * wp * cb, dw * cb, wb, lane)
                else:
                    lane[:] = 0
                    for i in range(kh):
                        for j in range(kw):
                            src, tap = start + (i * dh * wp + j * dw) * cb, (i * kw + j) * cb
                            for c in range(cb):
                                lane[c] += xp[_at(src + c)] * wb[_at(tap + c)]
                store_lanes(lane, cb, params, zero_point, qmin, qmax, half_even, requantize_out, stage)
                dst = out[b, :, oy, ox]
                for c in range(cb):
                    dst[_at(c0 + c)] = stage[c]


@numba.njit(cache=True, nogil=True, parallel=True)
def _im2col_kernel(x, x_zp, kh, kw, sh, sw, pt, pl, dh, dw, ho, wo, cols):
    """cols[b, (c, i, j), (oy, ox)] = x at that tap, or x_zp (real zero) in the padding."""
    n_batch, n_chan, h, wd = x.shape
    for bc in numba.prange(n_batch * n_chan):
        b, c = bc // n_chan, bc % n_chan
        for i in range(kh):
            for j in range(kw):
                row = (c * kh + i) * kw + j
                for oy in range(ho):
                    iy = oy * sh - pt + i * dh
                    for ox in range(wo):
                        ix = ox * sw - pl + j * dw
                        inside = 0 <= iy < h and 0 <= ix < wd
                        cols[b, row, oy * wo + ox] = x[b, c, iy, ix] if inside else x_zp


# Padded elements per depthwise buffer (per stride phase) up to which planes of one channel from several
# images are stacked: 16 KB of float32 keeps the buffer and the accumulator in L1/L2 while a 7x7 plane's
# 61-element loops become ~1000 long.
STACKED_ELEMENTS = 4096
# Output planes up to which depthwise convs hold channels innermost (_depthwise_channels_last_kernel). On
# MobileNetV2's depthwise shapes against the plane loop, same integers: 4x4 outputs 1.2-1.7x faster at
# batch 1 and 16; 7x7 1.14x at batch 1 but 0.81x at batch 16, and no gain in a whole batch-1 224 px
# forward; 8x8 0.93x at batch 1, slower beyond (docs/engine.md).
CHANNELS_LAST_MAX_OUTPUTS = 16
CHANNEL_BLOCK_MIN = 32  # channels per task: shorter lanes do not amortise a position's loop


def _prepare_depthwise(x_shape, x_dtype, x_zp, w, offset, geometry, ho, wo, out):
    """Depthwise conv on whichever loop suits its planes: channels innermost for small ones, else plane by plane."""
    taps = w.shape[2] * w.shape[3]
    exact = np.float32 if taps * largest_magnitude(x_dtype) * largest_magnitude(w.dtype) < FLOAT32_EXACT else np.float64
    dtype, arguments = kernel_arguments(out)
    (sh, sw), (dh, dw), (pt, pl, _, _) = geometry.stride, geometry.dilation, geometry.pads
    shape, (kh, kw) = (x_shape[0], w.shape[0], ho, wo), w.shape[2:]
    if ho * wo <= CHANNELS_LAST_MAX_OUTPUTS:
        floats = packed(w, ("depthwise channels last", exact), lambda: w.reshape(w.shape[0], -1).T.astype(exact).ravel())
        blocks_per_image = -(-2 * numba.get_num_threads() // x_shape[0])  # about two tasks a thread
        block = min(w.shape[0], max(CHANNEL_BLOCK_MIN, -(-w.shape[0] // blocks_per_image)))

        def channels_last(x):
            result = np.empty(shape, dtype=dtype)
            _depthwise_channels_last_kernel(x, x_zp, floats, kh, kw, offset, sh, sw, pt, pl, dh, dw, *arguments, block,
                                            result)
            return result

        return channels_last
    # phase rows and columns: the outputs plus the kernel's reach, in strides
    hq, wq = ho + ((kh - 1) * dh) // sh, wo + ((kw - 1) * dw) // sw
    stack = max(1, min(x_shape[0], STACKED_ELEMENTS // (hq * wq)))
    n_tasks = min(-(-x_shape[0] // stack) * w.shape[0], 8 * numba.get_num_threads())
    floats = packed(w, ("depthwise", exact), lambda: w.reshape(w.shape[0], -1).astype(exact))

    def planes(x):
        result = np.empty(shape, dtype=dtype)
        stages = np.empty((n_tasks, stack * hq * wq), np.int64 if out is None else np.int32)  # outputs before storing
        _depthwise_kernel(x, x_zp, floats, kh, kw, offset, sh, sw, pt, pl, dh, dw, hq, wq, *arguments, stack, stages,
                          result)
        return result

    return planes


def _prepare_conv(x_shape, x_dtype, x_zp, w, bias, geometry, out):
    """The function ``x -> conv`` for inputs of ``x_shape`` and ``x_dtype``, everything else computed once.
    It holds packed copies of ``w``, never ``w`` or a view of it (see ops.packing.prepared)."""
    (sh, sw), (dh, dw), (pt, pl, _, _) = geometry.stride, geometry.dilation, geometry.pads
    g = geometry.groups
    n, c, h, wd = x_shape
    o, cg, kh, kw = w.shape
    ho, wo = geometry.output_hw(h, wd, kh, kw)
    offset = zero_point_offset(bias, x_zp, w)
    if cg == 1 and o == g:
        return _prepare_depthwise(x_shape, x_dtype, x_zp, w, offset, geometry, ho, wo, out)
    og, k = o // g, cg * kh * kw
    # im2col columns: int8 for the int8 dot-product path, else the float type whose products are exact
    cols_dtype = np.int8 if int8_gemm.usable(x_dtype, w.dtype, k) else (np.float32 if x_dtype.itemsize == 1 else np.float64)
    pointwise = kh == kw == 1 and geometry.pads == (0, 0, 0, 0) and (sh, sw) == (1, 1)
    products = []  # a fused, tiled GEMM + requantization per group
    for gi in range(g):
        channels = slice(gi * og, (gi + 1) * og)
        wg = w[channels].reshape(og, k)
        products.append(prepare_matmul((n, k, ho * wo), x_dtype, wg, offset[channels],
                                       out if g == 1 else out and out.channels(channels), w, ("group", gi)))

    def run(x):
        groups = []
        for gi, product in enumerate(products):  # a 1x1 stride-1 conv needs no im2col
            xg = x if g == 1 else np.ascontiguousarray(x[:, gi * cg:(gi + 1) * cg])
            if pointwise:
                cols = xg.reshape(n, cg, h * wd)
            else:
                cols = np.empty((n, k, ho * wo), dtype=cols_dtype)
                _im2col_kernel(xg, x_zp, kh, kw, sh, sw, pt, pl, dh, dw, ho, wo, cols)
            groups.append(product(cols))
        return (groups[0] if g == 1 else np.concatenate(groups, axis=1)).reshape(n, o, ho, wo)

    return run


def conv_numba(x: np.ndarray, x_zp: int, w: np.ndarray, bias: np.ndarray, geometry: ConvGeometry,
               out: OutputSpec | None = None) -> np.ndarray:
    """Same integers as :func:`conv_reference`: direct loop for depthwise, else (im2col +) an exact product
    on int8 instructions or float BLAS (ops/matmul.py).

    Both compute ``sum x * w`` on the raw integers and add ``bias - x_zp * sum w`` per channel, fused
    into the requantization pass when ``out`` is given. What a call needs besides ``x`` is prepared once
    per input shape for a stored layer (ops.packing.prepared).
    """
    check_conv_shapes(x, w, geometry)
    x_zp = int(x_zp)
    run = prepared(w, ("conv", x.shape, x.dtype, x_zp, geometry), (bias, out),
                   lambda: _prepare_conv(x.shape, x.dtype, x_zp, w, bias, geometry, out))
    return run(np.ascontiguousarray(x))


@dataclass
class QConv(WeightedNode):
    geometry: ConvGeometry = ConvGeometry()

    op_type = "Conv"

    def compute(self, kernels, x, weight, bias, out):
        return kernels.conv(x, self.in_params.zero_point, weight, bias, self.geometry, out)

    @property
    def widens(self) -> bool:
        return self.geometry.groups == 1

    def macs(self, in_shapes, out_shape):
        o, cg, kh, kw = self.weight.shape
        return int(np.prod(out_shape)) * cg * kh * kw
