"""Test helpers: error metric, tolerances per dtype, tiny diffusers models."""

import torch

# rel-L2 against the fp32 reference, per input dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def rope_tables(seq_len: int, head_dim: int, device="cpu"):
    """FLUX RoPE tables for a (txt zeros + square image grid) sequence, as FluxPosEmbed builds them."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    third = head_dim // 8 * 2
    axes = (head_dim - 2 * third, third, third)
    ids = torch.stack([torch.zeros(seq_len), torch.arange(seq_len) // 8, torch.arange(seq_len) % 8], dim=-1)
    return FluxPosEmbed(theta=10000, axes_dim=axes)(ids.to(device))


def tiny_flux(head_dim=64, heads=2, dtype=torch.float32, device="cpu"):
    from diffusers import FluxTransformer2DModel

    third = head_dim // 8 * 2
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=False,
        axes_dims_rope=(head_dim - 2 * third, third, third),
    )
    with torch.no_grad():  # RMSNorm weights start at 1: randomise so the affine part is exercised
        for name, p in model.named_parameters():
            if "norm_q" in name or "norm_k" in name or "norm_added" in name:
                p.uniform_(0.5, 1.5)
    return model.to(device=device, dtype=dtype).eval()


def tiny_flux_inputs(text_tokens=7, grid=8, dtype=torch.float32, device="cpu"):
    n = grid * grid
    img_ids = torch.stack([torch.zeros(n), torch.arange(n) // grid, torch.arange(n) % grid], dim=-1)
    return dict(
        hidden_states=torch.randn(1, n, 16, dtype=dtype, device=device),
        encoder_hidden_states=torch.randn(1, text_tokens, 32, dtype=dtype, device=device),
        pooled_projections=torch.randn(1, 16, dtype=dtype, device=device),
        timestep=torch.tensor([0.5], dtype=dtype, device=device),
        img_ids=img_ids.to(device),
        txt_ids=torch.zeros(text_tokens, 3, device=device),
        return_dict=False,
    )
