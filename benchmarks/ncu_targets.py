"""A target program for Nsight Compute: the kernels the open performance targets depend on, through the public ops
(autotuned as users get them), the measured calls inside the NVTX range "prof".

    ncu --nvtx --nvtx-include "prof/" --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats \\
        python -m benchmarks.ncu_targets

The first pass tunes and warms up, the second runs in the range (so ncu profiles the tuned configs, not the
autotuner's trials): SANA-1.6B's linear attention and depthwise + GLU at a 128x128 latent (16384 tokens, bf16), W4A16
SVDQuant layers at M = 4608 (K x N = 3072 x 3072 and 15360 x 3072, rank 32; the effective-weight pass and its
cuBLAS GEMM), the Triton f8c16 patch embedding and unembedding at 4096 tokens (the latter split over D), and the
cuBLAS unembedding's unpack kernel, and FP8's GELU + quantize pass over the FFN's 4608 x 12288 hidden rows (the
down-projection's producer, the open FP8 per-layer target). On a CPU (TRITON_INTERPRET=1): tiny shapes, to
check the program itself. Results of such runs: `benchmarks/results/ncu_targets-*.txt`, read in PERF_NOTES.md.
"""

from __future__ import annotations

import torch


def run(device: torch.device) -> None:
    from dcgen_kernels.ops.fp8_linear import quantize_fp8
    from dcgen_kernels.ops.glumbconv import depthwise_glu
    from dcgen_kernels.ops.patch_embed import patch_embed, patch_unembed
    from dcgen_kernels.ops.sana_linear_attention import sana_linear_attention
    from dcgen_kernels.quant.svdquant import SVDQuantLinear

    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    tokens, heads, hidden, grid, m, side = (16384, 70, 5600, 128, 4608, 128) if gpu else (64, 2, 64, 8, 32, 8)
    layer_shapes = ((3072, 3072), (15360, 3072)) if gpu else ((64, 48),)
    width = 3072 if gpu else 96
    ffn_width = 12288 if gpu else 200
    torch.manual_seed(0)
    with torch.device(device):
        q, k, v = (torch.randn(1, tokens, heads * 32).to(dtype) for _ in range(3))
        pre = (2 * torch.randn(1, tokens, 2 * hidden)).to(dtype)  # SiLU's input: both signs, tails to ~-8
        depth_weight, depth_bias = (torch.randn(2 * hidden, 1, 3, 3) / 3).to(dtype), torch.randn(2 * hidden).to(dtype)
        layers = [(SVDQuantLinear.from_linear(torch.nn.Linear(k_in, n_out, dtype=dtype), rank=32, activations="bf16"),
                   torch.randn(m, k_in).to(dtype)) for k_in, n_out in layer_shapes]
        latent = torch.randn(1, 16, side, side).to(dtype)
        embed_weight, embed_bias = (torch.randn(width, 64) / 8).to(dtype), torch.randn(width).to(dtype)
        image_tokens = torch.randn(1, (side // 2) ** 2, width).to(dtype)
        unembed_weight = (torch.randn(64, width) / width ** 0.5).to(dtype)
        ffn_hidden = (2 * torch.randn(m, ffn_width)).to(dtype)  # the up-projection's output, before GELU

    def ops():
        sana_linear_attention(q, k, v, heads)
        depthwise_glu(pre, grid, grid, depth_weight, depth_bias)
        for layer, x in layers:
            layer(x)
        patch_embed(latent, embed_weight, embed_bias, patch_size=2, backend="triton" if gpu else "auto")
        for backend in ("triton", "cuda") if gpu else ("auto",):
            patch_unembed(image_tokens, unembed_weight, None, patch_size=2, height=side, width=side, backend=backend)
        quantize_fp8(ffn_hidden, gelu=True)

    with torch.no_grad():
        ops()
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_push("prof")
        ops()
        if gpu:
            torch.cuda.nvtx.range_pop()
            torch.cuda.synchronize()


def main() -> None:
    run(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    print("ncu targets ran")


if __name__ == "__main__":
    main()
