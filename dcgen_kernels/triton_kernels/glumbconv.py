"""Triton kernel for the middle of SANA's GLUMBConv: SiLU -> 3x3 depthwise conv -> x * SiLU(gate).

Reads the pre-activation of the inverted 1x1 conv channels-last, (B, H, W, 2*hid) with value channels first and
gate channels second (the order of `torch.chunk(..., 2, dim=1)`), and writes the gated (B, H*W, hid) tokens.
"""

import triton
import triton.language as tl


@triton.jit
def _silu(x):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _row_taps(pre_ptr, weight_ptr, pixel, w, W, channel, channel_ok, row_ok, C2):
    """SiLU of one input row at columns w-1, w, w+1, combined with each kernel row's three weights.

    Returns the row's contribution to the output row below (kernel row 0), level (1) and above (2) it. Out-of-image
    columns and rows load 0, and SiLU(0) = 0 is exactly the zero padding the stock conv applies after its SiLU.
    """
    offs = pixel.to(tl.int64)[:, None] * C2 + channel[None, :]
    ok = row_ok & channel_ok[None, :]
    left_ok = ok & (w[:, None] > 0) & (w[:, None] <= W)
    left = _silu(tl.load(pre_ptr + offs - C2, mask=left_ok, other=0.0).to(tl.float32))
    centre = _silu(tl.load(pre_ptr + offs, mask=ok & (w[:, None] < W), other=0.0).to(tl.float32))
    right = _silu(tl.load(pre_ptr + offs + C2, mask=ok & (w[:, None] + 1 < W), other=0.0).to(tl.float32))
    taps = weight_ptr + channel * 9  # depthwise weight (2*hid, 1, 3, 3) flattened to (2*hid, 9)
    below = (left * tl.load(taps, mask=channel_ok).to(tl.float32)[None, :]
             + centre * tl.load(taps + 1, mask=channel_ok).to(tl.float32)[None, :]
             + right * tl.load(taps + 2, mask=channel_ok).to(tl.float32)[None, :])
    level = (left * tl.load(taps + 3, mask=channel_ok).to(tl.float32)[None, :]
             + centre * tl.load(taps + 4, mask=channel_ok).to(tl.float32)[None, :]
             + right * tl.load(taps + 5, mask=channel_ok).to(tl.float32)[None, :])
    above = (left * tl.load(taps + 6, mask=channel_ok).to(tl.float32)[None, :]
             + centre * tl.load(taps + 7, mask=channel_ok).to(tl.float32)[None, :]
             + right * tl.load(taps + 8, mask=channel_ok).to(tl.float32)[None, :])
    return below, level, above


@triton.jit
def depthwise_glu_kernel(
    pre_ptr, weight_ptr, bias_ptr, out_ptr,
    H, W, HID, rows_per_program, row_blocks,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program: BLOCK_W columns x BLOCK_C value channels (and their gates) x `rows_per_program` output rows.

    It walks the input rows top to bottom, activating each loaded element three times (once per horizontal
    tap) instead of nine: a row's three kernel-row sums go into rolling accumulators for the output rows
    below, level with and above it, and the output row above is complete once its last input row is added.
    """
    w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    channel = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2) // row_blocks
    first_row = (tl.program_id(2) % row_blocks) * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, H)  # exclusive
    channel_ok = channel < HID
    gate_channel = channel + HID
    C2 = 2 * HID
    value_bias = tl.load(bias_ptr + channel, mask=channel_ok).to(tl.float32)[None, :]
    gate_bias = tl.load(bias_ptr + gate_channel, mask=channel_ok).to(tl.float32)[None, :]
    zero = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    value_done_at_next = zero  # output row i-1: has its rows i-2 and i-1 after step i-1
    value_pending = zero  # output row i: has its row i-1 after step i-1
    gate_done_at_next = zero
    gate_pending = zero
    store_ok = (w[:, None] < W) & channel_ok[None, :]
    for i in range(first_row - 1, last_row + 1):
        row_ok = (i >= 0) & (i < H)
        pixel = (b * H + i) * W + w
        v_below, v_level, v_above = _row_taps(pre_ptr, weight_ptr, pixel, w, W, channel, channel_ok, row_ok, C2)
        g_below, g_level, g_above = _row_taps(pre_ptr, weight_ptr, pixel, w, W, gate_channel, channel_ok, row_ok,
                                              C2)
        if i > first_row:  # output row i-1 is complete
            value = value_done_at_next + v_above + value_bias
            gate = gate_done_at_next + g_above + gate_bias
            out_offs = (pixel - W).to(tl.int64)[:, None] * HID + channel[None, :]
            tl.store(out_ptr + out_offs, (value * _silu(gate)).to(out_ptr.dtype.element_ty), mask=store_ok)
        value_done_at_next = value_pending + v_level
        gate_done_at_next = gate_pending + g_level
        value_pending = v_below
        gate_pending = g_below
