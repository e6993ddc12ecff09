import copy
import sys

import pytest
import torch

from dcgen_kernels.ops.key_padding_attention import key_padding_attention, key_padding_attention_reference
from dcgen_kernels.patching.sana import DCGenSanaCrossAttnProcessor
from tests.helpers import TOLERANCE, rel_l2

kpa_module = sys.modules["dcgen_kernels.ops.key_padding_attention"]
S_KV = 11


def prefix(*lengths):
    return torch.stack([torch.arange(S_KV) < n for n in lengths]).float()


def sana_bias(keep, dtype=torch.float32):
    """SanaTransformer2DModel.forward: (1 - mask) * -10000.0, unsqueezed to (B, 1, S_kv)."""
    return ((1 - keep.to(dtype)) * -10000.0).unsqueeze(1)


def qkv(B=2, H=3, S_q=13, D=16, dtype=torch.float32, device="cpu"):
    return [torch.randn(B, H, s, D, device=device).to(dtype) for s in (S_q, S_KV, S_KV)]


CASES = {  # keep mask -> (keys SDPA sees, whether it still gets a mask)
    "prefix_b1": (prefix(7), 7, False),
    "same_prefix_b2": (prefix(7, 7), 7, False),
    "scattered_b1": (torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0, 0, 0, 0]]).float(), [0, 2, 3, 6], False),
    "no_padding_b2": (prefix(S_KV, S_KV), None, False),
    "different_lengths_b2": (prefix(7, 3), 7, True),  # trimmed to the longest, masked
    "one_fully_padded_b2": (prefix(7, 0), None, True),  # diffusers' call unchanged
}


# --------------------------------------------------------------------------------------------- vs diffusers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_sana_cross_attention_processor(case, dtype):
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0

    keep, keys, masked = CASES[case]
    B = keep.shape[0]
    attn = Attention(query_dim=64, cross_attention_dim=48, heads=4, dim_head=16, bias=True, out_bias=True,
                     processor=SanaAttnProcessor2_0()).to(dtype).eval()
    hidden, enc = torch.randn(B, 23, 64).to(dtype), torch.randn(B, S_KV, 48).to(dtype)
    mask = sana_bias(keep, dtype)
    plan = kpa_module._plan(mask)
    assert (plan.keys.tolist() if torch.is_tensor(plan.keys) else plan.keys) == keys and plan.masked == masked
    with torch.no_grad():
        expected = attn(hidden, encoder_hidden_states=enc, attention_mask=mask)
        exact = copy.deepcopy(attn).float()(hidden.float(), encoder_hidden_states=enc.float(),
                                            attention_mask=mask.float())
        attn.set_processor(DCGenSanaCrossAttnProcessor(attn.processor, "auto"))
        ours = attn(hidden, encoder_hidden_states=enc, attention_mask=mask)
    if dtype == torch.float32:
        assert rel_l2(ours, expected) <= 1e-6
    else:  # other SDPA kernels (masked vs trimmed; AVX2 vs AVX-512 CPUs) round 16-bit math differently
        assert rel_l2(ours, exact) <= max(1.2 * rel_l2(expected, exact), TOLERANCE[dtype] / 10)  # ~1.0x seen


@pytest.mark.parametrize("shape", ["b_s", "b_1_s", "b_1_1_s"])
def test_bool_mask_equals_float_bias(shape):
    q, k, v = qkv()
    keep = prefix(7, 4).bool()
    mask = {"b_s": keep, "b_1_s": keep[:, None], "b_1_1_s": keep[:, None, None]}[shape]
    assert rel_l2(key_padding_attention(q, k, v, mask), key_padding_attention_reference(q, k, v, sana_bias(keep))) < 1e-6


def test_vmap_over_a_batch_of_masks_runs_the_masked_call():
    """Under torch.func.vmap the key plan cannot read the mask's values (.tolist() of a batched tensor failed):
    diffusers' masked call instead, per slice equal to the unbatched op."""
    q, k, v = qkv()
    masks = sana_bias(prefix(7, 3))  # (2, 1, S_kv): one mask per vmapped slice
    got = torch.func.vmap(lambda m: key_padding_attention(q, k, v, m))(masks[:, None])
    for i in range(2):
        assert rel_l2(got[i], key_padding_attention(q, k, v, masks[i:i + 1])) < 1e-6


def test_mask_shared_across_the_batch_slices_once():
    q, k, v = qkv(B=3)
    mask = sana_bias(prefix(5))
    assert kpa_module._plan(mask) == kpa_module._Plan(keys=5, masked=False)
    assert rel_l2(key_padding_attention(q, k, v, mask), key_padding_attention_reference(q, k, v, mask)) < 1e-6


def test_bias_that_requires_grad_gets_the_reference_gradient():
    """A learned bias keeps its gradient (a plan would slice the keys and drop it from the graph)."""
    q, k, v = qkv(B=3)
    bias = sana_bias(prefix(5)).requires_grad_()
    expected = bias.detach().clone().requires_grad_()
    key_padding_attention(q, k, v, bias).square().sum().backward()
    key_padding_attention_reference(q, k, v, expected).square().sum().backward()
    assert bias.grad is not None and rel_l2(bias.grad, expected.grad) < 1e-6 and expected.grad.abs().sum() > 0


def test_general_float_bias_runs_unchanged():
    q, k, v = qkv()
    mask = torch.randn(2, 1, S_KV)  # not a padding mask: nothing may be dropped
    assert kpa_module._plan(mask) == kpa_module._Plan(keys=None, masked=True)
    assert rel_l2(key_padding_attention(q, k, v, mask), key_padding_attention_reference(q, k, v, mask)) == 0


@pytest.mark.parametrize("values", ["moderate", "zero_or_minus_100"])
def test_float_bias_without_padding_sized_entries_is_applied_whole(values):
    """Only entries at or below the padding bias may count as dropped keys: a bias of small or moderate negative
    values (ALiBi-like, -100) is attention's input as it is."""
    q, k, v = qkv()
    mask = -0.9 * torch.rand(2, 1, S_KV) if values == "moderate" else \
        torch.where(torch.rand(2, 1, S_KV) < 0.5, 0.0, -100.0)
    assert kpa_module._plan(mask) == kpa_module._Plan(keys=None, masked=True)
    assert rel_l2(key_padding_attention(q, k, v, mask), key_padding_attention_reference(q, k, v, mask)) == 0


def test_positive_bias_entries_are_not_kept_keys_and_the_padding_threshold_is_inclusive():
    """A key is kept where its bias is exactly 0: a positive entry (a boost) needs the bias applied; an entry at
    exactly the padding threshold is padding."""
    q, k, v = qkv()
    boosted = sana_bias(prefix(7, 7))
    boosted[:, 0, 0] = 5.0
    assert kpa_module._plan(boosted) == kpa_module._Plan(keys=None, masked=True)
    assert rel_l2(key_padding_attention(q, k, v, boosted), key_padding_attention_reference(q, k, v, boosted)) == 0
    at_threshold = torch.where(prefix(7, 7).bool(), 0.0, kpa_module.PADDING_BIAS_MAX).unsqueeze(1)
    assert kpa_module._plan(at_threshold) == kpa_module._Plan(keys=7, masked=False)


def test_rows_keeping_as_many_keys_at_other_positions_are_not_one_key_set():
    q, k, v = qkv()
    alternating = (torch.arange(S_KV) % 2 == 0).float()
    mask = sana_bias(torch.stack([alternating, 1 - alternating[:S_KV]]))
    mask[1, 0, -1] = 0.0  # both rows keep 6 keys, at different positions
    out = key_padding_attention(q, k, v, mask)
    assert kpa_module._plan(mask).masked
    assert rel_l2(out, key_padding_attention_reference(q, k, v, mask)) < 1e-6


def test_fully_padded_row_attends_over_all_keys_like_diffusers():
    q, k, v = qkv(B=1)
    mask = sana_bias(prefix(0))
    out = key_padding_attention(q, k, v, mask)
    assert rel_l2(out, key_padding_attention_reference(q, k, v, mask)) == 0
    # A uniform -10000 shift leaves plain attention, up to the fp32 rounding of logits near -10000 (ulp 2**-10).
    assert rel_l2(out, torch.nn.functional.scaled_dot_product_attention(q, k, v)) < 2e-3


def test_plan_is_cached_per_mask_object(monkeypatch):
    calls = []
    plan = kpa_module._plan
    monkeypatch.setattr(kpa_module, "_plan", lambda mask: calls.append(1) or plan(mask))
    q, k, v = qkv()
    mask = sana_bias(prefix(7, 7))
    for _ in range(3):
        key_padding_attention(q, k, v, mask)
    assert len(calls) == 1
    mask[1, 0, 6] = -10000.0  # in-place edit: the cached plan no longer holds
    assert rel_l2(key_padding_attention(q, k, v, mask), key_padding_attention_reference(q, k, v, mask)) < 1e-6
    key_padding_attention(q, k, v, mask.clone())
    assert len(calls) == 3


def test_inference_mode_masks_are_planned_per_call(monkeypatch):
    """A mask made under torch.inference_mode has no version counter: an in-place edit must still be seen."""
    calls = []
    plan = kpa_module._plan
    monkeypatch.setattr(kpa_module, "_plan", lambda mask: calls.append(1) or plan(mask))
    q, k, v = qkv()
    with torch.inference_mode():
        mask = sana_bias(prefix(7, 7))
        key_padding_attention(q, k, v, mask)
        mask[1, 0, 6] = -10000.0
        out = key_padding_attention(q, k, v, mask)
    assert len(calls) == 2 and rel_l2(out, key_padding_attention_reference(q, k, v, mask)) < 1e-6


def test_capture_runs_the_masked_call_without_a_host_plan(monkeypatch):
    """A CUDA graph replays with other masks than the captured one: no host plan may be baked into it."""
    monkeypatch.setattr(kpa_module, "_capturing", lambda t: True)
    monkeypatch.setattr(kpa_module, "_plan", lambda mask: pytest.fail("planned on the host while capturing"))
    q, k, v = qkv()
    mask = sana_bias(prefix(7, 5))
    assert torch.equal(key_padding_attention(q, k, v, mask), key_padding_attention_reference(q, k, v, mask))


GRAPH_CASES = {  # keep mask -> graph key, with GRAPH_KEY_BUCKET 4 over S_KV = 11 keys
    "no_padding_b2": (prefix(S_KV, S_KV), ("keys", 11, False, 11)),
    "same_prefix_on_a_bucket_b2": (prefix(8, 8), ("keys", 8, False, 11)),
    "same_prefix_inside_a_bucket_b2": (prefix(7, 7), ("keys", 8, True, 11)),
    "scattered_b1": (torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0, 0, 0, 0]]).float(), ("keys", 8, True, 11)),
    "different_lengths_b2": (prefix(6, 3), ("keys", 8, True, 11)),
    "last_bucket_b2": (prefix(10, 3), ("keys", 11, True, 11)),
    "one_fully_padded_b2": (prefix(7, 0), ("diffusers", 11)),
}


@pytest.mark.parametrize("case", list(GRAPH_CASES))
def test_graph_plan_keys(monkeypatch, case):
    monkeypatch.setattr(kpa_module, "GRAPH_KEY_BUCKET", 4)
    keep, key = GRAPH_CASES[case]
    assert kpa_module.graph_plan(sana_bias(keep))[0] == key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_captured_plan_is_exact_for_every_mask_of_its_key(monkeypatch, dtype):
    """A graph replays its capture-time plan with each call's mask: every mask with the same key (the mask it was
    made from included) must give the masked call's result, with no host plan while capturing."""
    monkeypatch.setattr(kpa_module, "GRAPH_KEY_BUCKET", 4)
    q, k, v = qkv(dtype=dtype)
    masks = [sana_bias(keep, dtype) for keep, _ in GRAPH_CASES.values()]
    planned = [kpa_module.graph_plan(mask) for mask in masks]
    monkeypatch.setattr(kpa_module, "_capturing", lambda t: True)
    monkeypatch.setattr(kpa_module, "_plan", lambda m: pytest.fail("planned on the host while capturing"))
    checked = 0
    for key, plan in planned:
        for mask, (other_key, _) in zip(masks, planned):
            if other_key != key:
                continue
            B = mask.shape[0]
            with kpa_module.captured_with(plan, S_KV):
                got = key_padding_attention(q[:B], k[:B], v[:B], mask)
            want = key_padding_attention_reference(q[:B], k[:B], v[:B], mask)
            assert rel_l2(got, want) <= (1e-6 if dtype == torch.float32 else TOLERANCE[dtype] / 10), key
            checked += 1
    assert checked > len(masks)  # some keys are shared


@pytest.mark.parametrize("mask,error,match", [
    (torch.zeros(2, 3, 5), ValueError, "attn_mask must be a key-padding mask of shape"),
    (torch.zeros(2, 0), ValueError, "S_kv >= 1"),
    (torch.zeros(2, 5, dtype=torch.int64), TypeError, "attn_mask must have dtype"),
])
def test_graph_plan_rejects_what_is_not_a_key_padding_mask(mask, error, match):
    with pytest.raises(error, match=match):
        kpa_module.graph_plan(mask)


def test_captured_plan_for_another_key_count_is_not_used(monkeypatch):
    monkeypatch.setattr(kpa_module, "_capturing", lambda t: True)
    q, k, v = qkv()
    mask = sana_bias(prefix(7, 5))
    _, plan = kpa_module.graph_plan(sana_bias(prefix(S_KV, S_KV)))  # no mask, all keys: wrong for this mask
    with kpa_module.captured_with(plan, S_KV + 1):
        got = key_padding_attention(q, k, v, mask)
    assert torch.equal(got, key_padding_attention_reference(q, k, v, mask))


@pytest.mark.parametrize("mask", [torch.ones(0, 5, dtype=torch.bool), torch.zeros(0, 1, 1, 5)], ids=["bool", "bias"])
def test_empty_batch_returns_the_empty_result(mask):
    from dcgen_kernels.ops.key_padding_attention import graph_plan

    q, k, v = torch.randn(0, 2, 4, 16), torch.randn(0, 2, 5, 16), torch.randn(0, 2, 5, 8)
    assert key_padding_attention(q, k, v, mask).shape == (0, 2, 4, 8)
    assert graph_plan(mask)[0] == ("diffusers", 5)


def test_no_mask_is_plain_attention():
    q, k, v = qkv()
    scores = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    expected = scores.softmax(-1) @ v.double()
    assert rel_l2(key_padding_attention(q, k, v), expected) < TOLERANCE[q.dtype]


# --------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("call,error,match", [
    (lambda q, k, v, m: key_padding_attention(q[0], k, v, m), ValueError, "q must have 4 dimensions"),
    (lambda q, k, v, m: key_padding_attention(q.int(), k, v, m), TypeError, "q must have dtype"),
    (lambda q, k, v, m: key_padding_attention(q, k.half(), v, m), TypeError, "k must have dtype"),
    (lambda q, k, v, m: key_padding_attention(q, k, v.to("meta"), m), ValueError, "v must be on device"),
    (lambda q, k, v, m: key_padding_attention(q, k[:, :2], v, m), ValueError, "k must have shape"),
    (lambda q, k, v, m: key_padding_attention(q, k, v[:, :, :5], m), ValueError, "v must have shape"),
    (lambda q, k, v, m: key_padding_attention(q, k[:, :, :0], v[:, :, :0], m[..., :0]), ValueError,
     "at least one key"),
    (lambda q, k, v, m: key_padding_attention(q, k, v, [1, 0]), TypeError, "attn_mask must be a torch.Tensor"),
    (lambda q, k, v, m: key_padding_attention(q, k, v, m.long()), TypeError, "attn_mask must have dtype"),
    (lambda q, k, v, m: key_padding_attention(q, k, v, m[..., :5]), ValueError, "attn_mask must be a key-padding"),
    (lambda q, k, v, m: key_padding_attention(q, k, v, m.expand(2, 13, S_KV)), ValueError, "key-padding mask"),
    (lambda q, k, v, m: key_padding_attention(q, k, v, m.repeat(3, 1, 1)), ValueError, "key-padding mask"),
    (lambda q, k, v, m: key_padding_attention(q, k, v, m[:, 0]), TypeError, "a 2-D attn_mask must be bool"),
])
def test_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call(*qkv(), sana_bias(prefix(7, 3)))


# --------------------------------------------------------------------------------------------- compile
@pytest.mark.parametrize("case", ["same_prefix_b2", "different_lengths_b2"])
def test_traces_in_torch_compile_without_graph_breaks(case):
    """Traced, the op is diffusers' masked call (the key plan is data-dependent): same result, no graph break."""
    torch._dynamo.reset()
    q, k, v = qkv()
    mask = sana_bias(CASES[case][0])
    compiled = torch.compile(lambda *a: key_padding_attention(*a) * 2, fullgraph=True, backend="aot_eager")
    assert rel_l2(compiled(q, k, v, mask), 2 * key_padding_attention(q, k, v, mask)) < 1e-6


# --------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [(120, 120), (120, 7)], ids=["same_length", "different_lengths"])
def test_gpu_sana_cross_attention_shapes(lengths):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 20, s, 112, device="cuda", dtype=torch.bfloat16) for s in (4096, 300, 300))
    keep = torch.stack([torch.arange(300, device="cuda") < n for n in lengths])
    mask = ((1 - keep.to(torch.bfloat16)) * -10000.0).unsqueeze(1)
    expected = key_padding_attention_reference(q, k, v, mask)
    if lengths[0] == lengths[1]:  # the mask-free call must be served by flash attention
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            out = key_padding_attention(q, k, v, mask)
    else:
        out = key_padding_attention(q, k, v, mask)
    assert rel_l2(out, expected) <= TOLERANCE[torch.bfloat16] / 2  # flash vs masked kernel: bf16 output rounding
