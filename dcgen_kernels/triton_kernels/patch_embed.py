"""Triton GEMMs that read or write NCHW latents through the FLUX patch layout, so no packed copy exists.

Token t = ty * (w / p) + tx covers latent pixels (ty*p + i, tx*p + j); its feature f = c*p*p + i*p + j
(FLUX `_pack_latents` for p = 2, a plain channel index for p = 1). The latent offset of (t, f) splits into a
token part plus a feature part, so the gather/scatter costs one add per element over a dense GEMM.
"""

import triton
import triton.language as tl


@triton.jit
def _token_offsets(tokens, grid_w, stride_y, stride_x, PATCH: tl.constexpr):
    return (tokens // grid_w) * (PATCH * stride_y) + (tokens % grid_w) * (PATCH * stride_x)


@triton.jit
def _feature_offsets(features, stride_c, stride_y, stride_x, PATCH: tl.constexpr):
    return ((features // (PATCH * PATCH)) * stride_c + ((features // PATCH) % PATCH) * stride_y
            + (features % PATCH) * stride_x)


@triton.jit
def patch_embed_kernel(
    latent_ptr, weight_ptr, bias_ptr, out_ptr,
    n_tokens, grid_w, n_features, dim,
    stride_lb, stride_lc, stride_ly, stride_lx,
    stride_wd, stride_wf,
    stride_ob, stride_on,
    PATCH: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[b, t, d] = sum_f latent[b, patch(t, f)] * weight[d, f] + bias[d]; grid (token blocks, dim blocks, B)."""
    tokens = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    batch = tl.program_id(2).to(tl.int64)
    token_ok = tokens < n_tokens
    col_ok = cols < dim
    latent_rows = latent_ptr + batch * stride_lb + _token_offsets(tokens, grid_w, stride_ly, stride_lx, PATCH)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, n_features, BLOCK_K):
        feats = k0 + tl.arange(0, BLOCK_K)
        feat_ok = feats < n_features
        feat_off = _feature_offsets(feats, stride_lc, stride_ly, stride_lx, PATCH)
        # Cast at the load: DOT_DTYPE is the input dtype on GPU, fp32 under the interpreter (bf16 is wrong there).
        a = tl.load(latent_rows[:, None] + feat_off[None, :], mask=token_ok[:, None] & feat_ok[None, :],
                    other=0.0).to(DOT_DTYPE)
        w = tl.load(weight_ptr + feats[:, None] * stride_wf + cols[None, :] * stride_wd,
                    mask=feat_ok[:, None] & col_ok[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(a, w, acc, input_precision="ieee")  # "ieee" only changes fp32 operands: no TF32
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + batch * stride_ob + tokens[:, None] * stride_on + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=token_ok[:, None] & col_ok[None, :])


@triton.jit
def patch_unembed_kernel(
    tokens_ptr, weight_ptr, bias_ptr, out_ptr,
    n_tokens, grid_w, n_features, dim,
    stride_tb, stride_tn, stride_td,
    stride_wf, stride_wd,
    stride_ob, stride_oc, stride_oy, stride_ox,
    PATCH: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[b, patch(t, f)] = sum_d tokens[b, t, d] * weight[f, d] + bias[f]; grid (token blocks, feature blocks, B)."""
    tokens = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    feats = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    batch = tl.program_id(2).to(tl.int64)
    token_ok = tokens < n_tokens
    feat_ok = feats < n_features
    token_rows = tokens_ptr + batch * stride_tb + tokens[:, None] * stride_tn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < dim
        a = tl.load(token_rows + ks[None, :] * stride_td, mask=token_ok[:, None] & k_ok[None, :],
                    other=0.0).to(DOT_DTYPE)
        w = tl.load(weight_ptr + ks[:, None] * stride_wd + feats[None, :] * stride_wf,
                    mask=k_ok[:, None] & feat_ok[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(a, w, acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + feats, mask=feat_ok, other=0.0).to(tl.float32)[None, :]
    # Epilogue scatter straight into NCHW: the unpack is just the store's addressing.
    out = (out_ptr + batch * stride_ob + _token_offsets(tokens, grid_w, stride_oy, stride_ox, PATCH)[:, None]
           + _feature_offsets(feats, stride_oc, stride_oy, stride_ox, PATCH)[None, :])
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=token_ok[:, None] & feat_ok[None, :])


@triton.jit
def patch_weight_grad_kernel(
    latent_ptr, dense_ptr, partial_ptr, bias_partial_ptr,
    n_tokens, grid_w, n_features, dim, total_tokens, tokens_per_split,
    stride_lb, stride_lc, stride_ly, stride_lx,
    stride_db, stride_dn, stride_dd,
    PATCH: tl.constexpr, BIAS_FROM: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """partial[s, f, d] = sum over the tokens t of split s of packed(latent)[t, f] * dense[t, d].

    Weight gradient of both ops: patch_embed's (latent, grad of tokens) and patch_unembed's (grad of latent, tokens).
    t runs over all B * N tokens, so the batch is part of the reduction; splits of the token range fill the GPU
    (the output is only features x dim) and the host sums their fp32 partials. BIAS_FROM 1: the programs of the
    first feature block also sum dense over tokens (patch_embed's bias grad); 2: the programs of the first dim
    block sum the packed latent (patch_unembed's bias grad).
    """
    feats = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(2)
    feat_ok = feats < n_features
    col_ok = cols < dim
    feat_off = _feature_offsets(feats, stride_lc, stride_ly, stride_lx, PATCH)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, total_tokens)
    acc = tl.zeros([BLOCK_F, BLOCK_D], dtype=tl.float32)
    if BIAS_FROM == 1:
        bias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    else:
        bias_acc = tl.zeros([BLOCK_F], dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < end
        batch = (t // n_tokens).to(tl.int64)
        token = t % n_tokens
        # The packing is gathered in the load: the A operand is packed(latent)^T, read straight from NCHW.
        token_off = batch * stride_lb + _token_offsets(token, grid_w, stride_ly, stride_lx, PATCH)
        # Cast at the load, as the forward kernels do (fp32 under the interpreter: bf16 arithmetic is wrong there).
        a = tl.load(latent_ptr + token_off[None, :] + feat_off[:, None], mask=feat_ok[:, None] & t_ok[None, :],
                    other=0.0).to(DOT_DTYPE)
        d = tl.load(dense_ptr + (batch * stride_db + token * stride_dn)[:, None] + cols[None, :] * stride_dd,
                    mask=t_ok[:, None] & col_ok[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(a, d, acc, input_precision="ieee")
        if BIAS_FROM == 1:
            bias_acc += tl.sum(d.to(tl.float32), axis=0)
        if BIAS_FROM == 2:
            bias_acc += tl.sum(a.to(tl.float32), axis=1)
    tl.store(partial_ptr + (split * n_features + feats[:, None]).to(tl.int64) * dim + cols[None, :], acc,
             mask=feat_ok[:, None] & col_ok[None, :])
    if BIAS_FROM == 1:
        tl.store(bias_partial_ptr + split * dim + cols, bias_acc, mask=col_ok & (tl.program_id(0) == 0))
    if BIAS_FROM == 2:
        tl.store(bias_partial_ptr + split * n_features + feats, bias_acc, mask=feat_ok & (tl.program_id(1) == 0))
