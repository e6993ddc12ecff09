"""Triton kernel for the middle of SANA's GLUMBConv: SiLU -> 3x3 depthwise conv -> x * SiLU(gate).

Reads the pre-activation of the inverted 1x1 conv channels-last, (B, H, W, 2*hid) with value channels first and
gate channels second (the order of `torch.chunk(..., 2, dim=1)`), and writes the gated (B, H*W, hid) tokens.
"""

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

# Output rows per program. Each program loads STRIP_ROWS + 2 input rows per column, so the SiLU runs
# (STRIP_ROWS + 2) / STRIP_ROWS times per element; more rows cost registers for the rolling sums.
STRIP_ROWS = tl.constexpr(4)
# The interpreter has no libdevice: there the SiLU keeps the exactly rounded operations (same formula).
FAST_SILU = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def _silu(x, TANH_SILU: tl.constexpr):
    """x / (1 + e^-x). On a GPU with the exponential and the division as single approximate MUFU operations
    (`__expf`, `__fdividef`: a few fp32 ulp, far below the 16-bit output rounding) instead of `tl.exp` and `/`,
    whose range and subnormal handling took ~10 SASS instructions per SiLU. The kernel was issue-bound: with this
    and the fused-multiply-add taps its sm_90a loop went from 756 to 500 instructions per column step (8 outputs per
    thread), 64 of them MUFU.

    TANH_SILU (the launcher sets it for 16-bit outputs): h + h * tanh(h), h = x / 2, with `tanh.approx.f32`, one
    MUFU operation and two FP32 ones instead of two and three. Its documented error bound (2**-11) is relative to
    tanh, so for x << 0, where 1 + tanh(h) cancels, SiLU's absolute error grows like 2**-12 |x|: under a 16-bit
    output's rounding, not fp32's. H100 (2026-11-27, run I): the SANA-1.6B 128x128 kernel 0.341 -> 0.293 ms, the
    output's rel-L2 to the fp32 reference 1.7e-3 either way (stock diffusers in bf16: 5.0e-3)."""
    if FAST_SILU:
        if TANH_SILU:
            h = 0.5 * x
            tanh = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [h], dtype=tl.float32,
                                             is_pure=True, pack=1)
            return h + h * tanh
        return libdevice.fast_dividef(x, 1.0 + libdevice.fast_expf(-x))
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _load_column(pre_ptr, lanes, ok, top, column, b, H, W, C2):
    """The raw pre-activations at `column` of input rows top-1 .. top+STRIP_ROWS for the [BLOCK_C] lanes; 0 outside
    the image, which is exactly the zero padding stock applies after its SiLU (SiLU(0) = 0)."""
    row_step = W.to(tl.int64) * C2
    ptrs = pre_ptr + ((b * H + top - 1) * W + column).to(tl.int64) * C2 + lanes
    return (tl.load(ptrs, mask=ok & (top >= 1), other=0.0),
            tl.load(ptrs + row_step, mask=ok & (top < H), other=0.0),
            tl.load(ptrs + 2 * row_step, mask=ok & (top + 1 < H), other=0.0),
            tl.load(ptrs + 3 * row_step, mask=ok & (top + 2 < H), other=0.0),
            tl.load(ptrs + 4 * row_step, mask=ok & (top + 3 < H), other=0.0),
            tl.load(ptrs + 5 * row_step, mask=ok & (top + 4 < H), other=0.0))


@triton.jit
def _load_taps(weight_ptr, lanes, lane_ok):
    """The nine depthwise weights of the [BLOCK_C] lanes as fp32, from the conv's own (2*HID, 1, 3, 3) weight (lane c's
    tap t at c * 9 + t): loaded once per program, so their stride-9 gather costs nothing next to the activations
    (and no per-call copy into another layout)."""
    taps = weight_ptr + lanes * 9
    return (tl.load(taps + 0, mask=lane_ok).to(tl.float32), tl.load(taps + 1, mask=lane_ok).to(tl.float32),
            tl.load(taps + 2, mask=lane_ok).to(tl.float32), tl.load(taps + 3, mask=lane_ok).to(tl.float32),
            tl.load(taps + 4, mask=lane_ok).to(tl.float32), tl.load(taps + 5, mask=lane_ok).to(tl.float32),
            tl.load(taps + 6, mask=lane_ok).to(tl.float32), tl.load(taps + 7, mask=lane_ok).to(tl.float32),
            tl.load(taps + 8, mask=lane_ok).to(tl.float32))


@triton.jit
def _taps(acc, above, level, below, w_above, w_level, w_below):
    """acc + one kernel column's three vertical taps: a chain of three fused multiply-adds."""
    return acc + above * w_above + level * w_level + below * w_below


@triton.jit
def _column_step(raw0, raw1, raw2, raw3, raw4, raw5, done0, done1, done2, done3, pending0, pending1, pending2,
                 pending3, bias, w00, w01, w02, w10, w11, w12, w20, w21, w22, TANH_SILU: tl.constexpr):
    """Activate one input column's STRIP_ROWS + 2 pixels once and add them to the output pixels of the strip they
    touch: through the right kernel column they complete output column j-1 (returned first), through the centre
    one they continue column j (`done`), through the left one they start column j+1 from the bias (`pending`)."""
    a0 = _silu(raw0.to(tl.float32), TANH_SILU)
    a1 = _silu(raw1.to(tl.float32), TANH_SILU)
    a2 = _silu(raw2.to(tl.float32), TANH_SILU)
    a3 = _silu(raw3.to(tl.float32), TANH_SILU)
    a4 = _silu(raw4.to(tl.float32), TANH_SILU)
    a5 = _silu(raw5.to(tl.float32), TANH_SILU)
    return (_taps(done0, a0, a1, a2, w02, w12, w22), _taps(done1, a1, a2, a3, w02, w12, w22),
            _taps(done2, a2, a3, a4, w02, w12, w22), _taps(done3, a3, a4, a5, w02, w12, w22),
            _taps(pending0, a0, a1, a2, w01, w11, w21), _taps(pending1, a1, a2, a3, w01, w11, w21),
            _taps(pending2, a2, a3, a4, w01, w11, w21), _taps(pending3, a3, a4, a5, w01, w11, w21),
            _taps(bias, a0, a1, a2, w00, w10, w20), _taps(bias, a1, a2, a3, w00, w10, w20),
            _taps(bias, a2, a3, a4, w00, w10, w20), _taps(bias, a3, a4, a5, w00, w10, w20))


@triton.jit
def _store_gated(out_ptrs, value, gate, mask, TANH_SILU: tl.constexpr):
    tl.store(out_ptrs, (value * _silu(gate, TANH_SILU)).to(out_ptrs.dtype.element_ty), mask=mask)


def _configs():
    """(value channels per program, warps) to time on the first call of each (H, W, HID, dtype): two channels per
    thread (149 registers on sm_90a; the hand-picked H100 default before) or one (82 registers, twice the programs
    in flight per SM); four would spill. The interpreter takes one small block, so the test shapes cover full and
    partial channel blocks."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return [triton.Config({"BLOCK_C": 64}, num_warps=1)]
    return [triton.Config({"BLOCK_C": block_c}, num_warps=warps)
            for block_c, warps in ((128, 2), (64, 1), (256, 4), (64, 2), (128, 4), (256, 8))]


@triton.autotune(configs=_configs(), key=["H", "W", "HID"])
@triton.jit
def depthwise_glu_kernel(pre_ptr, weight_ptr, bias_ptr, out_ptr, H, W, HID, BLOCK_C: tl.constexpr,
                         TANH_SILU: tl.constexpr):
    """One program: BLOCK_C value channels and their gates x STRIP_ROWS output rows x the whole width.

    It sweeps the columns left to right, loading each column one step ahead of its math. Each column's
    STRIP_ROWS + 2 input pixels are activated once; through the left, centre and right kernel column they belong
    to the output columns right of, at and left of it.
    Rolling accumulators carry the partial outputs: before column j, done_t holds output (top+t, j-1) but for its
    right kernel column and pending_t holds the bias plus output (top+t, j)'s left kernel column, so column j
    completes output column j-1. Every tap is one fused multiply-add into its accumulator. weight_ptr: the
    contiguous (2*HID, 1, 3, 3) depthwise weight, held in fp32 registers.
    """
    channel = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    top = tl.program_id(1) * STRIP_ROWS
    b = tl.program_id(2)
    C2 = 2 * HID
    channel_ok = channel < HID
    gate_lanes = channel + HID
    vw00, vw01, vw02, vw10, vw11, vw12, vw20, vw21, vw22 = _load_taps(weight_ptr, channel, channel_ok)
    gw00, gw01, gw02, gw10, gw11, gw12, gw20, gw21, gw22 = _load_taps(weight_ptr, gate_lanes, channel_ok)
    value_bias = tl.load(bias_ptr + channel, mask=channel_ok).to(tl.float32)
    gate_bias = tl.load(bias_ptr + gate_lanes, mask=channel_ok).to(tl.float32)
    value_done0 = tl.zeros([BLOCK_C], dtype=tl.float32)
    value_done1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    value_done2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    value_done3 = tl.zeros([BLOCK_C], dtype=tl.float32)
    gate_done0 = tl.zeros([BLOCK_C], dtype=tl.float32)
    gate_done1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    gate_done2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    gate_done3 = tl.zeros([BLOCK_C], dtype=tl.float32)
    value_pending0 = value_bias
    value_pending1 = value_bias
    value_pending2 = value_bias
    value_pending3 = value_bias
    gate_pending0 = gate_bias
    gate_pending1 = gate_bias
    gate_pending2 = gate_bias
    gate_pending3 = gate_bias
    value_raw0, value_raw1, value_raw2, value_raw3, value_raw4, value_raw5 = _load_column(
        pre_ptr, channel, channel_ok, top, 0, b, H, W, C2)
    gate_raw0, gate_raw1, gate_raw2, gate_raw3, gate_raw4, gate_raw5 = _load_column(
        pre_ptr, gate_lanes, channel_ok, top, 0, b, H, W, C2)
    out_row_step = W.to(tl.int64) * HID
    # Column W is the right zero padding. Unrolled by two, the next column's loads and the rolling sums mostly
    # alternate between two register sets instead of being copied back at the end of each column. Triton 3.6,
    # sm_90a, the (128, 2) config: 465 -> 400 SASS instructions per column with the one-address stores below (422
    # with those alone; moves 42 -> 24.5, integer multiply-adds 41 -> 13.5), at 167 instead of 147 registers: the
    # same 6 programs per SM.
    for j in tl.range(0, W + 1, loop_unroll_factor=2):
        # Column j+1's loads go out before column j's math, so they overlap it (zeros past the right edge).
        next_ok = channel_ok & (j + 1 < W)
        next_value0, next_value1, next_value2, next_value3, next_value4, next_value5 = _load_column(
            pre_ptr, channel, next_ok, top, j + 1, b, H, W, C2)
        next_gate0, next_gate1, next_gate2, next_gate3, next_gate4, next_gate5 = _load_column(
            pre_ptr, gate_lanes, next_ok, top, j + 1, b, H, W, C2)
        (value_out0, value_out1, value_out2, value_out3, value_done0, value_done1, value_done2, value_done3,
         value_pending0, value_pending1, value_pending2, value_pending3) = _column_step(
            value_raw0, value_raw1, value_raw2, value_raw3, value_raw4, value_raw5,
            value_done0, value_done1, value_done2, value_done3,
            value_pending0, value_pending1, value_pending2, value_pending3, value_bias,
            vw00, vw01, vw02, vw10, vw11, vw12, vw20, vw21, vw22, TANH_SILU)
        (gate_out0, gate_out1, gate_out2, gate_out3, gate_done0, gate_done1, gate_done2, gate_done3,
         gate_pending0, gate_pending1, gate_pending2, gate_pending3) = _column_step(
            gate_raw0, gate_raw1, gate_raw2, gate_raw3, gate_raw4, gate_raw5,
            gate_done0, gate_done1, gate_done2, gate_done3,
            gate_pending0, gate_pending1, gate_pending2, gate_pending3, gate_bias,
            gw00, gw01, gw02, gw10, gw11, gw12, gw20, gw21, gw22, TANH_SILU)
        if j > 0:  # output column j-1: one address, the strip's rows a row step apart
            out_column = out_ptr + ((b * H + top) * W + j - 1).to(tl.int64) * HID + channel
            _store_gated(out_column, value_out0, gate_out0, channel_ok & (top < H), TANH_SILU)
            _store_gated(out_column + out_row_step, value_out1, gate_out1, channel_ok & (top + 1 < H), TANH_SILU)
            _store_gated(out_column + 2 * out_row_step, value_out2, gate_out2, channel_ok & (top + 2 < H),
                         TANH_SILU)
            _store_gated(out_column + 3 * out_row_step, value_out3, gate_out3, channel_ok & (top + 3 < H),
                         TANH_SILU)
        value_raw0, value_raw1, value_raw2, value_raw3, value_raw4, value_raw5 = (
            next_value0, next_value1, next_value2, next_value3, next_value4, next_value5)
        gate_raw0, gate_raw1, gate_raw2, gate_raw3, gate_raw4, gate_raw5 = (
            next_gate0, next_gate1, next_gate2, next_gate3, next_gate4, next_gate5)
