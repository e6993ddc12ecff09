"""`key_padding_attention`: SANA's masked cross-attention through SDPA's fast (mask-free) backends.

SANA turns the caption mask (1 = keep, 0 = pad) into an additive bias `(1 - mask) * -10000.0` of shape
(B, 1, S_kv) and hands it to SDPA, and any float mask rules out the flash and cuDNN backends. A padded key's
weight is exp(s - 10000 - max) (bf16: -9984), which underflows to exactly 0 in the fp32 softmax unless logits
are ~9900 apart, so dropping the padded keys gives the same attention. When every batch element keeps the
same keys, they are sliced (a prefix) or gathered and SDPA runs without a mask; when the sets differ, the key
range is trimmed to the last key any element keeps and SDPA runs with the mask. A batch element whose keys
are all padded gets the same shift on every logit, i.e. plain attention over all keys: that case, and a float
mask that is not a padding mask (entries other than 0 and <= -1000), run diffusers' masked call unchanged.

The plan needs the mask's content on the host: one device sync per distinct mask. It is cached for the last
mask object seen (unmodified), so the 20 SANA blocks of one step share it; not for a mask made under
torch.inference_mode, which has no version counter to tell an in-place change (one sync per call there; diffusers'
pipelines run under torch.no_grad). Under torch.compile tracing diffusers' masked call runs instead (data-dependent
shapes would break a compiled graph). A captured CUDA graph replays with other masks than the one it was captured
with: there the plan comes from `graph_plan`, made before the capture and exact for every mask of its key (the
graph wrapper keeps one graph per key), else diffusers' masked call runs.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ._common import FLOAT_DTYPES, check_tensor

__all__ = ["captured_with", "graph_plan", "key_padding_attention", "key_padding_attention_reference",
           "PADDING_BIAS_MAX", "SANA_MASK_BIAS"]

SANA_MASK_BIAS = -10000.0  # SanaTransformer2DModel.forward: (1 - mask) * -10000.0
# Bias entries at or below this count as padding: exp(-1000 + logit gap) is 0 in fp32 for any gap under ~900.
PADDING_BIAS_MAX = -1000.0


def key_padding_attention_reference(q, k, v, attn_mask=None):
    """What SanaAttnProcessor2_0 computes: SDPA with diffusers' additive bias (bool masks converted like SANA)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_additive_bias(attn_mask, q.dtype))


# ----------------------------------------------------------------------------------------------- validation
def _validate(q, k, v, attn_mask) -> None:
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("v", v, ndim=4, dtypes=(q.dtype,), device=q.device)
    B, H, _, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"k must have shape (B={B}, H={H}, S_kv, D={D}) like q (B, H, S_q, D), got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must have shape (B={B}, H={H}, S_kv={k.shape[2]}, D_v), got {tuple(v.shape)}")
    if k.shape[2] == 0:
        raise ValueError("k and v must hold at least one key (S_kv >= 1)")
    if attn_mask is None:
        return
    check_tensor("attn_mask", attn_mask, dtypes=FLOAT_DTYPES + (torch.bool,), device=q.device)
    S_kv = k.shape[2]
    if not is_key_padding_shape(attn_mask, B, S_kv):
        raise ValueError(f"attn_mask must be a key-padding mask of shape (B, S_kv), (B, 1, S_kv) or (B, 1, 1, S_kv) "
                         f"with B in (1, {B}), S_kv = {S_kv}, got {tuple(attn_mask.shape)}")
    if attn_mask.dim() == 2 and attn_mask.dtype != torch.bool:
        raise TypeError("a 2-D attn_mask must be bool (True = attend); pass diffusers' additive float bias as "
                        f"(B, 1, S_kv), got dtype {attn_mask.dtype}")


def is_key_padding_shape(attn_mask: torch.Tensor, B: int, S_kv: int) -> bool:
    """Whether attn_mask has a key-padding mask's shape: (B or 1, S_kv), (B or 1, 1, S_kv) or (B or 1, 1, 1, S_kv)."""
    return (2 <= attn_mask.dim() <= 4 and attn_mask.shape[0] in (1, B)
            and attn_mask.shape[1:] == (1,) * (attn_mask.dim() - 2) + (S_kv,))


# ----------------------------------------------------------------------------------------------- plan
def _additive_bias(attn_mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The mask as SDPA gets it from SANA: a float bias broadcasting as (B, 1, 1, S_kv)."""
    if attn_mask is None:
        return None
    mask = attn_mask.reshape(attn_mask.shape[0], 1, 1, attn_mask.shape[-1])
    if mask.dtype == torch.bool:
        return torch.where(mask, 0.0, SANA_MASK_BIAS).to(dtype)
    return mask.to(dtype)


@dataclass(frozen=True)
class _Plan:
    """keys: None (all), an int (that prefix), or a LongTensor of key indices; masked: keep the bias."""

    keys: object
    masked: bool


def _keep(attn_mask: torch.Tensor) -> torch.Tensor:
    rows = attn_mask.reshape(attn_mask.shape[0], attn_mask.shape[-1])
    return rows if rows.dtype == torch.bool else rows == 0


def _summary(attn_mask: torch.Tensor) -> list:
    """[padding, same_keys, min_kept, max_end, all_prefix] of the mask, with one host sync: whether it is a padding
    mask, every batch element keeps the same keys, the fewest keys one keeps, one past the last kept key, and
    whether every element keeps a prefix."""
    rows = attn_mask.reshape(attn_mask.shape[0], attn_mask.shape[-1])
    if rows.shape[0] == 0:  # an empty batch: nothing to trim; diffusers' masked call returns the empty result
        return [0, 1, 0, 0, 1]
    keep = _keep(attn_mask)
    is_padding = (keep | (rows <= PADDING_BIAS_MAX)).all() if rows.dtype != torch.bool else keep.new_ones(())
    positions = torch.arange(1, keep.shape[1] + 1, device=keep.device)
    kept = keep.sum(1)
    end = torch.where(keep, positions, 0).amax(1)  # one past the last kept key
    return torch.stack([is_padding.long(), (keep == keep[:1]).all().long(), kept.min(), end.max(),
                        (kept == end).all().long()]).tolist()


def _plan(attn_mask: torch.Tensor) -> _Plan:
    if attn_mask.is_meta:  # no values to plan with: diffusers' masked call (shapes only)
        return _Plan(keys=None, masked=True)
    padding, same_keys, min_kept, max_end, all_prefix = _summary(attn_mask)
    S_kv = attn_mask.shape[-1]
    if not padding or min_kept == 0:
        return _Plan(keys=None, masked=True)  # diffusers' call: exact, and any fully padded row stays as it is
    if same_keys:
        if all_prefix:
            return _Plan(keys=None if max_end == S_kv else max_end, masked=False)
        return _Plan(keys=_keep(attn_mask)[0].nonzero().squeeze(1), masked=False)
    return _Plan(keys=None if max_end == S_kv else max_end, masked=True)


_cache: dict = {}


def _cached_plan(attn_mask: torch.Tensor) -> _Plan:
    """The plan of the last mask seen, while that very tensor is alive and its version counter unchanged (so one
    host sync per step, not per block). Writes that bypass the counter (`.data`, NumPy, DLPack) are not seen."""
    if attn_mask.is_inference():  # no version counter: an in-place change could not be seen
        return _plan(attn_mask)
    ref, version, plan = _cache.get("last", (None, None, None))
    if ref is not None and ref() is attn_mask and version == attn_mask._version:
        return plan
    plan = _plan(attn_mask)
    _cache["last"] = (weakref.ref(attn_mask), attn_mask._version, plan)
    return plan


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


# ----------------------------------------------------------------------------------------------- CUDA graphs
# A captured graph replays with whatever mask its input buffer holds, so no plan may be made from the mask during
# the capture. The graph wrapper (patching/cuda_graph.py) asks for `graph_plan` of each call's mask instead and
# keeps one graph per key: the plan is exact for every mask with that key. The key range is rounded up to a
# multiple of GRAPH_KEY_BUCKET (the keys past the last kept one stay masked) so that a few graphs serve all
# captions: SANA's 300 text tokens give at most 3 ranges, each with and without the mask.
GRAPH_KEY_BUCKET = 128
_capture_plans: list = []  # [(plan, S_kv)] while a graph is captured under `captured_with`


def graph_plan(attn_mask: torch.Tensor) -> tuple:
    """(key, plan) for a graph that runs `key_padding_attention` with this mask or any other of the same key (one
    host sync). The plan keeps the first `end` keys (`end` the last kept key rounded up to GRAPH_KEY_BUCKET, at most
    S_kv) and the mask unless every batch element keeps exactly those keys; a mask that is not a padding mask, or
    has a batch element without keys, gets diffusers' masked call."""
    check_tensor("attn_mask", attn_mask, dtypes=FLOAT_DTYPES + (torch.bool,))
    if attn_mask.dim() not in (2, 3, 4) or attn_mask.shape[-1] == 0 or attn_mask.numel() != \
            attn_mask.shape[0] * attn_mask.shape[-1]:
        raise ValueError(f"attn_mask must be a key-padding mask of shape (B, S_kv), (B, 1, S_kv) or (B, 1, 1, S_kv) "
                         f"with S_kv >= 1, got {tuple(attn_mask.shape)}")
    padding, same_keys, min_kept, max_end, all_prefix = _summary(attn_mask)
    S_kv = attn_mask.shape[-1]
    if not padding or min_kept == 0:
        return ("diffusers", S_kv), _Plan(keys=None, masked=True)
    end = min(S_kv, -(-max_end // GRAPH_KEY_BUCKET) * GRAPH_KEY_BUCKET)
    masked = not (same_keys and all_prefix and max_end == end)
    return ("keys", end, masked, S_kv), _Plan(keys=None if end == S_kv else end, masked=masked)


@contextlib.contextmanager
def captured_with(plan: _Plan, S_kv: int):
    """Within: a key_padding_attention call being captured in a CUDA graph with a mask of S_kv keys follows `plan`
    (from graph_plan of the mask the graph is captured for) instead of diffusers' masked call."""
    _capture_plans.append((plan, S_kv))
    try:
        yield
    finally:
        _capture_plans.pop()


# ----------------------------------------------------------------------------------------------- public API
def key_padding_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of q over the keys the mask keeps, as SanaAttnProcessor2_0's masked SDPA computes it.

    q: (B, H, S_q, D); k, v: (B, H, S_kv, D) / (B, H, S_kv, D_v), one float dtype, one device.
    attn_mask: None; a bool mask (True = attend) of shape (B, S_kv), (B, 1, S_kv) or (B, 1, 1, S_kv); or
    diffusers' additive float bias (0 = attend, -10000 = padded) of shape (B, 1, S_kv) or (B, 1, 1, S_kv).
    A leading 1 in place of B broadcasts. Returns (B, H, S_q, D_v) in q's dtype. Default softmax scale.
    """
    _validate(q, k, v, attn_mask)
    if attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    # traced or vmapped (the key plan reads the mask's values), or a learned bias that keeps its gradient
    if (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or (attn_mask.requires_grad and torch.is_grad_enabled())):
        return key_padding_attention_reference(q, k, v, attn_mask)
    if _capturing(q):
        if not _capture_plans or _capture_plans[-1][1] != attn_mask.shape[-1]:
            return key_padding_attention_reference(q, k, v, attn_mask)
        plan = _capture_plans[-1][0]
    else:
        plan = _cached_plan(attn_mask)
    bias = _additive_bias(attn_mask, q.dtype) if plan.masked else None
    if isinstance(plan.keys, int):
        k, v = k[:, :, :plan.keys], v[:, :, :plan.keys]
        bias = bias[..., :plan.keys] if bias is not None else None
    elif plan.keys is not None:
        k, v = k.index_select(2, plan.keys), v.index_select(2, plan.keys)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
