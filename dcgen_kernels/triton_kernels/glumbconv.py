"""Triton kernel for the middle of SANA's GLUMBConv: SiLU -> 3x3 depthwise conv -> x * SiLU(gate).

Reads the pre-activation of the inverted 1x1 conv channels-last, (B, H, W, 2*hid) with value channels first and
gate channels second (the order of `torch.chunk(..., 2, dim=1)`), and writes the gated (B, H*W, hid) tokens.
"""

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

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
def _load_pair(ptrs, row_step, ok, FIRST: tl.constexpr, top, H):
    """The raw pre-activations of input rows top+FIRST-1 and top+FIRST at `ptrs` (row top-1); 0 outside the image,
    which is exactly the zero padding stock applies after its SiLU (SiLU(0) = 0)."""
    if FIRST == 0:
        upper_ok = ok & (top >= 1)
    else:
        upper_ok = ok & (top + FIRST - 1 < H)
    return (tl.load(ptrs + FIRST * row_step, mask=upper_ok, other=0.0),
            tl.load(ptrs + (FIRST + 1) * row_step, mask=ok & (top + FIRST < H), other=0.0))


@triton.jit
def _column_pointers(pre_ptr, lanes, top, column, b, H, W, C2):
    """Pointers to `column` of input row top-1 for the [BLOCK_C] lanes, and the step between rows."""
    return pre_ptr + ((b * H + top - 1) * W + column).to(tl.int64) * C2 + lanes, W.to(tl.int64) * C2


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
def _column_taps(a0, a1, a2, a3, a4, a5, done0, done1, done2, done3, pending0, pending1, pending2, pending3,
                 bias, w00, w01, w02, w10, w11, w12, w20, w21, w22):
    """Add one input column's activated pixels a0..a5 (rows t-1 .. t+4) to the output pixels of rows t .. t+3
    they touch: through the right kernel column they complete output column j-1 (returned first), through the
    centre one they continue column j (`done`), through the left one they start column j+1 from the bias
    (`pending`)."""
    return (_taps(done0, a0, a1, a2, w02, w12, w22), _taps(done1, a1, a2, a3, w02, w12, w22),
            _taps(done2, a2, a3, a4, w02, w12, w22), _taps(done3, a3, a4, a5, w02, w12, w22),
            _taps(pending0, a0, a1, a2, w01, w11, w21), _taps(pending1, a1, a2, a3, w01, w11, w21),
            _taps(pending2, a2, a3, a4, w01, w11, w21), _taps(pending3, a3, a4, a5, w01, w11, w21),
            _taps(bias, a0, a1, a2, w00, w10, w20), _taps(bias, a1, a2, a3, w00, w10, w20),
            _taps(bias, a2, a3, a4, w00, w10, w20), _taps(bias, a3, a4, a5, w00, w10, w20))


@triton.jit
def _activate(raw0, raw1, TANH_SILU: tl.constexpr):
    return _silu(raw0.to(tl.float32), TANH_SILU), _silu(raw1.to(tl.float32), TANH_SILU)


@triton.jit
def _store_gated(out_ptr, value, gate, row, column, b, H, W, HID, channel, channel_ok, TANH_SILU: tl.constexpr):
    pixel = ((b * H + row) * W + column).to(tl.int64)
    tl.store(out_ptr + pixel * HID + channel, (value * _silu(gate, TANH_SILU)).to(out_ptr.dtype.element_ty),
             mask=channel_ok & (row < H))


def _configs():
    """(value channels per program, warps, output rows per program) to time on the first call of each (H, W, HID,
    dtype): two channels per thread (147-160 registers on sm_90a at 4 rows; the hand-picked H100 default before)
    or one (80-92 registers, twice the programs in flight per SM); four would spill. 8-row strips activate each
    input pixel 10/8 instead of 6/4 times per output at about 1.6x the registers (session 14: untimed).
    The interpreter takes one small block, so the test shapes cover full and partial channel blocks."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return [triton.Config({"BLOCK_C": 64, "STRIP_ROWS": 4}, num_warps=1)]
    return [triton.Config({"BLOCK_C": block_c, "STRIP_ROWS": rows}, num_warps=warps)
            for block_c, warps, rows in ((128, 2, 4), (64, 1, 4), (256, 4, 4), (64, 2, 4), (128, 4, 4), (256, 8, 4),
                                         (128, 2, 8), (64, 2, 8))]


@triton.autotune(configs=_configs(), key=["H", "W", "HID"])
@triton.jit
def depthwise_glu_kernel(pre_ptr, weight_ptr, bias_ptr, out_ptr, H, W, HID, BLOCK_C: tl.constexpr,
                         STRIP_ROWS: tl.constexpr, TANH_SILU: tl.constexpr):
    """One program: BLOCK_C value channels and their gates x STRIP_ROWS (4 or 8) output rows x the whole width.

    It sweeps the columns left to right, loading each column one step ahead of its math. Each column's
    STRIP_ROWS + 2 input pixels are activated once; through the left, centre and right kernel column they belong
    to the output columns right of, at and left of it.
    Rolling accumulators carry the partial outputs: before column j, done_t holds output (top+t, j-1) but for its
    right kernel column and pending_t holds the bias plus output (top+t, j)'s left kernel column, so column j
    completes output column j-1. Every tap is one fused multiply-add into its accumulator. weight_ptr: the
    contiguous (2*HID, 1, 3, 3) depthwise weight, held in fp32 registers.
    Rows 4-7 exist only in 8-row strips: their loads, math and loop-carried sums sit behind `STRIP_ROWS == 8`,
    so a 4-row strip compiles to the 4-row kernel alone.
    """
    tl.static_assert(STRIP_ROWS == 4 or STRIP_ROWS == 8)
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
    zeros = tl.zeros([BLOCK_C], dtype=tl.float32)
    value_done0, value_done1, value_done2, value_done3 = zeros, zeros, zeros, zeros
    gate_done0, gate_done1, gate_done2, gate_done3 = zeros, zeros, zeros, zeros
    value_pending0, value_pending1, value_pending2, value_pending3 = value_bias, value_bias, value_bias, value_bias
    gate_pending0, gate_pending1, gate_pending2, gate_pending3 = gate_bias, gate_bias, gate_bias, gate_bias
    value_done4, value_done5, value_done6, value_done7 = zeros, zeros, zeros, zeros
    gate_done4, gate_done5, gate_done6, gate_done7 = zeros, zeros, zeros, zeros
    value_pending4, value_pending5, value_pending6, value_pending7 = value_bias, value_bias, value_bias, value_bias
    gate_pending4, gate_pending5, gate_pending6, gate_pending7 = gate_bias, gate_bias, gate_bias, gate_bias

    value_ptrs, row_step = _column_pointers(pre_ptr, channel, top, 0, b, H, W, C2)
    gate_ptrs, row_step = _column_pointers(pre_ptr, gate_lanes, top, 0, b, H, W, C2)
    value_raw0, value_raw1 = _load_pair(value_ptrs, row_step, channel_ok, 0, top, H)
    value_raw2, value_raw3 = _load_pair(value_ptrs, row_step, channel_ok, 2, top, H)
    value_raw4, value_raw5 = _load_pair(value_ptrs, row_step, channel_ok, 4, top, H)
    gate_raw0, gate_raw1 = _load_pair(gate_ptrs, row_step, channel_ok, 0, top, H)
    gate_raw2, gate_raw3 = _load_pair(gate_ptrs, row_step, channel_ok, 2, top, H)
    gate_raw4, gate_raw5 = _load_pair(gate_ptrs, row_step, channel_ok, 4, top, H)
    if STRIP_ROWS == 8:
        value_raw6, value_raw7 = _load_pair(value_ptrs, row_step, channel_ok, 6, top, H)
        value_raw8, value_raw9 = _load_pair(value_ptrs, row_step, channel_ok, 8, top, H)
        gate_raw6, gate_raw7 = _load_pair(gate_ptrs, row_step, channel_ok, 6, top, H)
        gate_raw8, gate_raw9 = _load_pair(gate_ptrs, row_step, channel_ok, 8, top, H)
    for j in range(0, W + 1):  # column W is the right zero padding
        # Column j+1's loads go out before column j's math, so they overlap it (zeros past the right edge).
        next_ok = channel_ok & (j + 1 < W)
        value_ptrs, row_step = _column_pointers(pre_ptr, channel, top, j + 1, b, H, W, C2)
        gate_ptrs, row_step = _column_pointers(pre_ptr, gate_lanes, top, j + 1, b, H, W, C2)
        next_value0, next_value1 = _load_pair(value_ptrs, row_step, next_ok, 0, top, H)
        next_value2, next_value3 = _load_pair(value_ptrs, row_step, next_ok, 2, top, H)
        next_value4, next_value5 = _load_pair(value_ptrs, row_step, next_ok, 4, top, H)
        next_gate0, next_gate1 = _load_pair(gate_ptrs, row_step, next_ok, 0, top, H)
        next_gate2, next_gate3 = _load_pair(gate_ptrs, row_step, next_ok, 2, top, H)
        next_gate4, next_gate5 = _load_pair(gate_ptrs, row_step, next_ok, 4, top, H)
        if STRIP_ROWS == 8:
            next_value6, next_value7 = _load_pair(value_ptrs, row_step, next_ok, 6, top, H)
            next_value8, next_value9 = _load_pair(value_ptrs, row_step, next_ok, 8, top, H)
            next_gate6, next_gate7 = _load_pair(gate_ptrs, row_step, next_ok, 6, top, H)
            next_gate8, next_gate9 = _load_pair(gate_ptrs, row_step, next_ok, 8, top, H)

        value0, value1 = _activate(value_raw0, value_raw1, TANH_SILU)
        value2, value3 = _activate(value_raw2, value_raw3, TANH_SILU)
        value4, value5 = _activate(value_raw4, value_raw5, TANH_SILU)
        gate0, gate1 = _activate(gate_raw0, gate_raw1, TANH_SILU)
        gate2, gate3 = _activate(gate_raw2, gate_raw3, TANH_SILU)
        gate4, gate5 = _activate(gate_raw4, gate_raw5, TANH_SILU)
        (value_out0, value_out1, value_out2, value_out3, value_done0, value_done1, value_done2, value_done3,
         value_pending0, value_pending1, value_pending2, value_pending3) = _column_taps(
            value0, value1, value2, value3, value4, value5, value_done0, value_done1, value_done2, value_done3,
            value_pending0, value_pending1, value_pending2, value_pending3, value_bias,
            vw00, vw01, vw02, vw10, vw11, vw12, vw20, vw21, vw22)
        (gate_out0, gate_out1, gate_out2, gate_out3, gate_done0, gate_done1, gate_done2, gate_done3,
         gate_pending0, gate_pending1, gate_pending2, gate_pending3) = _column_taps(
            gate0, gate1, gate2, gate3, gate4, gate5, gate_done0, gate_done1, gate_done2, gate_done3,
            gate_pending0, gate_pending1, gate_pending2, gate_pending3, gate_bias,
            gw00, gw01, gw02, gw10, gw11, gw12, gw20, gw21, gw22)
        if STRIP_ROWS == 8:
            value6, value7 = _activate(value_raw6, value_raw7, TANH_SILU)
            value8, value9 = _activate(value_raw8, value_raw9, TANH_SILU)
            gate6, gate7 = _activate(gate_raw6, gate_raw7, TANH_SILU)
            gate8, gate9 = _activate(gate_raw8, gate_raw9, TANH_SILU)
            (value_out4, value_out5, value_out6, value_out7, value_done4, value_done5, value_done6, value_done7,
             value_pending4, value_pending5, value_pending6, value_pending7) = _column_taps(
                value4, value5, value6, value7, value8, value9, value_done4, value_done5, value_done6, value_done7,
                value_pending4, value_pending5, value_pending6, value_pending7, value_bias,
                vw00, vw01, vw02, vw10, vw11, vw12, vw20, vw21, vw22)
            (gate_out4, gate_out5, gate_out6, gate_out7, gate_done4, gate_done5, gate_done6, gate_done7,
             gate_pending4, gate_pending5, gate_pending6, gate_pending7) = _column_taps(
                gate4, gate5, gate6, gate7, gate8, gate9, gate_done4, gate_done5, gate_done6, gate_done7,
                gate_pending4, gate_pending5, gate_pending6, gate_pending7, gate_bias,
                gw00, gw01, gw02, gw10, gw11, gw12, gw20, gw21, gw22)
        if j > 0:
            _store_gated(out_ptr, value_out0, gate_out0, top, j - 1, b, H, W, HID, channel, channel_ok, TANH_SILU)
            _store_gated(out_ptr, value_out1, gate_out1, top + 1, j - 1, b, H, W, HID, channel, channel_ok,
                         TANH_SILU)
            _store_gated(out_ptr, value_out2, gate_out2, top + 2, j - 1, b, H, W, HID, channel, channel_ok,
                         TANH_SILU)
            _store_gated(out_ptr, value_out3, gate_out3, top + 3, j - 1, b, H, W, HID, channel, channel_ok,
                         TANH_SILU)
            if STRIP_ROWS == 8:
                _store_gated(out_ptr, value_out4, gate_out4, top + 4, j - 1, b, H, W, HID, channel, channel_ok,
                             TANH_SILU)
                _store_gated(out_ptr, value_out5, gate_out5, top + 5, j - 1, b, H, W, HID, channel, channel_ok,
                             TANH_SILU)
                _store_gated(out_ptr, value_out6, gate_out6, top + 6, j - 1, b, H, W, HID, channel, channel_ok,
                             TANH_SILU)
                _store_gated(out_ptr, value_out7, gate_out7, top + 7, j - 1, b, H, W, HID, channel, channel_ok,
                             TANH_SILU)
        value_raw0, value_raw1, value_raw2 = next_value0, next_value1, next_value2
        value_raw3, value_raw4, value_raw5 = next_value3, next_value4, next_value5
        gate_raw0, gate_raw1, gate_raw2, gate_raw3, gate_raw4, gate_raw5 = (
            next_gate0, next_gate1, next_gate2, next_gate3, next_gate4, next_gate5)
        if STRIP_ROWS == 8:
            value_raw6, value_raw7, value_raw8, value_raw9 = next_value6, next_value7, next_value8, next_value9
            gate_raw6, gate_raw7, gate_raw8, gate_raw9 = next_gate6, next_gate7, next_gate8, next_gate9
