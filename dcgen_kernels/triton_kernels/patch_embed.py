"""Triton GEMMs that read or write NCHW latents through the FLUX patch layout, so no packed copy exists.

Token t = ty * grid_w + tx covers latent pixels (ty*p + i, tx*p + j); its feature f = c*p*p + i*p + j (FLUX
`_pack_latents` for p = 2, a plain channel index for p = 1). A program owns BLOCK_M tokens of a token row ty (of
TOKEN_ROWS rows in the unembedding), so each latent row r = c*p + i it touches is one contiguous run of pixels
x = tx*p + j per token row: loads and stores are whole runs (vectorised, coalesced), and for p = 2 the run is split
into its j = 0 / j = 1 halves in registers. Feature f = r*p + j, so the GEMM over f is one dot per j over the rows r.
The embedding has two kernels: the general one (one output tile per program, any number of rows) and the narrow one
(latents of up to 128 rows per token row, which gathers once and streams its output tiles). The unembedding has one,
with an optional split of its reduction over D (small grids).
"""

import triton
import triton.language as tl


@triton.jit
def patch_embed_kernel(
    latent_ptr, weight_ptr, bias_ptr, out_ptr,
    grid_w, n_rows, dim,
    stride_lb, stride_lc, stride_ly, stride_lx,
    stride_wd, stride_wf,
    stride_ob, stride_on,
    PATCH: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[b, t, d] = sum_f packed(latent)[b, t, f] * weight[d, f] + bias[d].

    grid (token rows * cdiv(grid_w, BLOCK_M), cdiv(dim, BLOCK_N), B); n_rows = C * PATCH latent rows per token row.
    """
    row_blocks = tl.cdiv(grid_w, BLOCK_M)
    ty = tl.program_id(0) // row_blocks
    tx0 = (tl.program_id(0) % row_blocks) * BLOCK_M
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    batch = tl.program_id(2).to(tl.int64)
    col_ok = cols < dim
    band = latent_ptr + batch * stride_lb + ty * (PATCH * stride_ly)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        row_off = (rows // PATCH) * stride_lc + (rows % PATCH) * stride_ly
        # Cast at the load: DOT_DTYPE is the input dtype on GPU, fp32 under the interpreter (bf16 is wrong there).
        if PATCH == 1:
            tx = tx0 + tl.arange(0, BLOCK_M)
            a = tl.load(band + tx[:, None] * stride_lx + row_off[None, :],
                        mask=(tx < grid_w)[:, None] & row_ok[None, :], other=0.0).to(DOT_DTYPE)
            w = tl.load(weight_ptr + rows[:, None] * stride_wf + cols[None, :] * stride_wd,
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(DOT_DTYPE)
            acc = tl.dot(a, w, acc, input_precision="ieee")  # "ieee" only changes fp32 operands: no TF32
        else:
            px = tx0 * 2 + tl.arange(0, 2 * BLOCK_M)
            runs = tl.load(band + row_off[:, None] + px[None, :] * stride_lx,
                           mask=row_ok[:, None] & (px < 2 * grid_w)[None, :], other=0.0).to(DOT_DTYPE)
            a0, a1 = tl.split(tl.reshape(runs, (BLOCK_R, BLOCK_M, 2)))  # (r, tx) for j = 0 and j = 1
            feats = r0 * 2 + tl.arange(0, 2 * BLOCK_R)  # f = r*2 + j: contiguous in weight's rows
            w = tl.load(weight_ptr + cols[:, None] * stride_wd + feats[None, :] * stride_wf,
                        mask=col_ok[:, None] & (feats < 2 * n_rows)[None, :], other=0.0).to(DOT_DTYPE)
            w0, w1 = tl.split(tl.reshape(w, (BLOCK_N, BLOCK_R, 2)))
            acc = tl.dot(tl.trans(a0), tl.trans(w0), acc, input_precision="ieee")
            acc = tl.dot(tl.trans(a1), tl.trans(w1), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tx = tx0 + tl.arange(0, BLOCK_M)
    tokens = ty * grid_w + tx
    out = out_ptr + batch * stride_ob + tokens[:, None].to(tl.int64) * stride_on + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(tx < grid_w)[:, None] & col_ok[None, :])


@triton.jit
def patch_embed_narrow_kernel(
    latent_ptr, weight_ptr, bias_ptr, out_ptr, out_desc,
    grid_w, n_rows, dim,
    stride_lb, stride_lc, stride_ly, stride_lx,
    stride_wd, stride_wf,
    stride_ob, stride_on,
    PATCH: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, N_TILES: tl.constexpr,
    TMA_STORE: tl.constexpr,
):
    """patch_embed_kernel for latents whose C * PATCH rows fit one BLOCK_R (every FLUX / DC-AE layout): the program
    gathers its BLOCK_M tokens' whole feature vectors once, then streams N_TILES output tiles through them, the
    weight tiles pipelined under the stores. The GEMM is K = C*p^2 <= 128 deep, so writing the output is its cost;
    one-tile programs re-gathered and re-arranged the latent for every tile and stalled on each gather.
    TMA_STORE: each tile leaves through out_desc, a (B, N, dim) descriptor of out with block [1, BLOCK_M, BLOCK_N]
    (one bulk copy per tile instead of a round trip through shared memory into per-thread stores); it clips at N
    and dim but not at a token row's end, so the launcher sets it only where BLOCK_M divides grid_w.

    grid (token rows * cdiv(grid_w, BLOCK_M), cdiv(dim, N_TILES * BLOCK_N), B).
    """
    row_blocks = tl.cdiv(grid_w, BLOCK_M)
    ty = tl.program_id(0) // row_blocks
    tx0 = (tl.program_id(0) % row_blocks) * BLOCK_M
    batch = tl.program_id(2).to(tl.int64)
    band = latent_ptr + batch * stride_lb + ty * (PATCH * stride_ly)
    rows = tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    row_off = (rows // PATCH) * stride_lc + (rows % PATCH) * stride_ly
    tx = tx0 + tl.arange(0, BLOCK_M)
    tx_ok = tx < grid_w
    if PATCH == 1:
        a = tl.load(band + tx[:, None] * stride_lx + row_off[None, :], mask=tx_ok[:, None] & row_ok[None, :],
                    other=0.0).to(DOT_DTYPE)
    else:  # whole pixel runs, rearranged in registers to (token, f = r*2 + j): the weight's own feature order
        px = tx0 * 2 + tl.arange(0, 2 * BLOCK_M)
        runs = tl.load(band + row_off[:, None] + px[None, :] * stride_lx,
                       mask=row_ok[:, None] & (px < 2 * grid_w)[None, :], other=0.0).to(DOT_DTYPE)
        a = tl.reshape(tl.permute(tl.reshape(runs, (BLOCK_R, BLOCK_M, 2)), (1, 0, 2)), (BLOCK_M, 2 * BLOCK_R))
    feats = tl.arange(0, PATCH * BLOCK_R)
    feat_ok = feats < PATCH * n_rows
    out_rows = out_ptr + batch * stride_ob + (ty * grid_w + tx)[:, None].to(tl.int64) * stride_on
    n_first = tl.program_id(1) * (N_TILES * BLOCK_N)
    for n0 in range(n_first, tl.minimum(n_first + N_TILES * BLOCK_N, dim), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < dim
        w = tl.load(weight_ptr + feats[:, None] * stride_wf + cols[None, :] * stride_wd,
                    mask=feat_ok[:, None] & col_ok[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(a, w, input_precision="ieee")
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if TMA_STORE:
            out_desc.store([tl.program_id(2), ty * grid_w + tx0, n0],
                           tl.reshape(acc.to(out_desc.dtype), (1, BLOCK_M, BLOCK_N)))
        else:
            tl.store(out_rows + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=tx_ok[:, None] & col_ok[None, :])


@triton.jit
def patch_unembed_kernel(
    tokens_ptr, weight_ptr, bias_ptr, out_ptr, partial_ptr, arrivals_ptr,
    grid_h, grid_w, n_rows, dim, split_depth,
    stride_tb, stride_tn, stride_td,
    stride_wf, stride_wd,
    stride_ob, stride_oc, stride_oy, stride_ox,
    PATCH: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, TOKEN_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """out[b, latent row r, pixel x] = sum_d tokens[b, t, d] * weight[r*PATCH + j, d] + bias[...], x = tx*PATCH + j.

    grid (cdiv(grid_h, TOKEN_ROWS) * cdiv(grid_w, BLOCK_M), cdiv(n_rows, BLOCK_R), B * SPLIT_K): a program owns
    BLOCK_M tokens of each of TOKEN_ROWS token rows, one accumulator per j, and the epilogue interleaves them into
    whole pixel runs, so the unpack is the store's addressing. The GEMM is N = C*p*p <= 128 wide: the program count
    is set by the tokens per program, and fewer tokens per program re-read the whole weight from L2 more often. So
    small grids split D into SPLIT_K slices of split_depth (a BLOCK_K multiple) instead: each program writes its
    fp32 partial to `partial`, then counts itself in at its tile's counter in `arrivals`; the last of the tile's
    SPLIT_K programs sums the partials in slice order (bitwise the same result whatever the arrival order), stores
    the latent and resets the counter to zero (`arrivals` must be zero at launch and is zero again after it).
    """
    row_blocks = tl.cdiv(grid_w, BLOCK_M)
    ty0 = (tl.program_id(0) // row_blocks) * TOKEN_ROWS
    tx0 = (tl.program_id(0) % row_blocks) * BLOCK_M
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    batch = (tl.program_id(2) // SPLIT_K).to(tl.int64)
    k_slice = tl.program_id(2) % SPLIT_K
    row_ok = rows < n_rows
    slot = tl.arange(0, TOKEN_ROWS * BLOCK_M)  # token (ty0 + slot // BLOCK_M, tx0 + slot % BLOCK_M)
    ty = ty0 + slot // BLOCK_M
    tx = tx0 + slot % BLOCK_M
    token_ok = (ty < grid_h) & (tx < grid_w)
    token_rows = tokens_ptr + batch * stride_tb + (ty * grid_w + tx)[:, None].to(tl.int64) * stride_tn
    acc0 = tl.zeros([TOKEN_ROWS * BLOCK_M, BLOCK_R], dtype=tl.float32)
    acc1 = tl.zeros([TOKEN_ROWS * BLOCK_M, BLOCK_R], dtype=tl.float32)
    k_begin = k_slice * split_depth
    for k0 in range(k_begin, tl.minimum(k_begin + split_depth, dim), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < dim
        a = tl.load(token_rows + ks[None, :] * stride_td, mask=token_ok[:, None] & k_ok[None, :],
                    other=0.0).to(DOT_DTYPE)
        w_mask = k_ok[:, None] & row_ok[None, :]
        w0 = tl.load(weight_ptr + ks[:, None] * stride_wd + (rows * PATCH)[None, :] * stride_wf, mask=w_mask,
                     other=0.0).to(DOT_DTYPE)
        acc0 = tl.dot(a, w0, acc0, input_precision="ieee")
        if PATCH == 2:
            w1 = tl.load(weight_ptr + ks[:, None] * stride_wd + (rows * 2 + 1)[None, :] * stride_wf, mask=w_mask,
                         other=0.0).to(DOT_DTYPE)
            acc1 = tl.dot(a, w1, acc1, input_precision="ieee")
    if SPLIT_K == 1:
        _store_latent(out_ptr, bias_ptr, acc0, acc1, batch, rows, row_ok, ty0, tx0, grid_h, grid_w,
                      stride_ob, stride_oc, stride_oy, stride_ox, PATCH, HAS_BIAS, BLOCK_M, TOKEN_ROWS, BLOCK_R)
    else:
        tile = ((tl.program_id(2) // SPLIT_K) * tl.num_programs(0) + tl.program_id(0)) * tl.num_programs(1) \
            + tl.program_id(1)
        tile_size: tl.constexpr = TOKEN_ROWS * BLOCK_M * BLOCK_R
        elems = slot[:, None] * BLOCK_R + tl.arange(0, BLOCK_R)[None, :]
        parts = partial_ptr + tile.to(tl.int64) * (SPLIT_K * PATCH * tile_size) + elems  # [slice][j][slot][row]
        tl.store(parts + (k_slice * PATCH) * tile_size, acc0)
        if PATCH == 2:
            tl.store(parts + (k_slice * 2 + 1) * tile_size, acc1)
        tl.debug_barrier()  # every thread's partial stores precede the release below
        if tl.atomic_add(arrivals_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1:
            acc0 = tl.zeros([TOKEN_ROWS * BLOCK_M, BLOCK_R], dtype=tl.float32)
            acc1 = tl.zeros([TOKEN_ROWS * BLOCK_M, BLOCK_R], dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):  # .cg: from L2, where the other SMs' partials are
                acc0 += tl.load(parts + (s * PATCH) * tile_size, cache_modifier=".cg")
                if PATCH == 2:
                    acc1 += tl.load(parts + (s * 2 + 1) * tile_size, cache_modifier=".cg")
            tl.atomic_xchg(arrivals_ptr + tile, 0)
            _store_latent(out_ptr, bias_ptr, acc0, acc1, batch, rows, row_ok, ty0, tx0, grid_h, grid_w,
                          stride_ob, stride_oc, stride_oy, stride_ox, PATCH, HAS_BIAS, BLOCK_M, TOKEN_ROWS, BLOCK_R)


@triton.jit
def _store_latent(out_ptr, bias_ptr, acc0, acc1, batch, rows, row_ok, ty0, tx0, grid_h, grid_w,
                  stride_ob, stride_oc, stride_oy, stride_ox,
                  PATCH: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, TOKEN_ROWS: tl.constexpr,
                  BLOCK_R: tl.constexpr):
    """patch_unembed_kernel's epilogue: bias, then the tile's tokens written as latent pixels."""
    if HAS_BIAS:
        acc0 += tl.load(bias_ptr + rows * PATCH, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        if PATCH == 2:
            acc1 += tl.load(bias_ptr + rows * 2 + 1, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    row_off = (rows // PATCH) * stride_oc + (rows % PATCH) * stride_oy
    out = out_ptr + batch * stride_ob
    if PATCH == 1:
        slot = tl.arange(0, TOKEN_ROWS * BLOCK_M)
        ty = ty0 + slot // BLOCK_M
        tx = tx0 + slot % BLOCK_M
        tl.store(out + (ty * stride_oy + tx * stride_ox)[:, None] + row_off[None, :], acc0.to(out_ptr.dtype.element_ty),
                 mask=((ty < grid_h) & (tx < grid_w))[:, None] & row_ok[None, :])
    else:
        # (r, slot * 2 + j): per token row, x = tx*2 + j runs over 2 * BLOCK_M contiguous pixels
        runs = tl.reshape(tl.join(tl.trans(acc0), tl.trans(acc1)), (BLOCK_R, 2 * TOKEN_ROWS * BLOCK_M))
        q = tl.arange(0, 2 * TOKEN_ROWS * BLOCK_M)
        ty = ty0 + q // (2 * BLOCK_M)
        px = tx0 * 2 + q % (2 * BLOCK_M)
        tl.store(out + row_off[:, None] + (ty * (2 * stride_oy) + px * stride_ox)[None, :],
                 runs.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & ((ty < grid_h) & (px < 2 * grid_w))[None, :])


@triton.jit
def patch_pack_kernel(
    latent_ptr, packed_ptr,
    grid_w, n_rows, n_tokens,
    stride_lb, stride_lc, stride_ly, stride_lx,
    stride_pn, tail_cols,
    PATCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, TAIL: tl.constexpr,
):
    """packed[b * N + t, f] = latent[b, c, ty*PATCH + i, tx*PATCH + j], f = r*PATCH + j, r = c*PATCH + i: the token
    matrix the cuBLAS path multiplies (FLUX `_pack_latents`), read as whole pixel runs and written as whole token
    rows (a plain permuted copy reads 2-4 useful bytes per 32-byte sector). With TAIL > 0 each row continues with
    tail_cols <= TAIL columns 1, 0, ..., 0 (the ones column that carries the bias gradient in the weight's GEMM).

    grid (token rows * cdiv(grid_w, BLOCK_M), cdiv(n_rows, BLOCK_R), B).
    """
    row_blocks = tl.cdiv(grid_w, BLOCK_M)
    ty = tl.program_id(0) // row_blocks
    tx0 = (tl.program_id(0) % row_blocks) * BLOCK_M
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    batch = tl.program_id(2).to(tl.int64)
    row_off = (rows // PATCH) * stride_lc + (rows % PATCH) * stride_ly
    px = tx0 * PATCH + tl.arange(0, PATCH * BLOCK_M)
    band = latent_ptr + batch * stride_lb + ty * (PATCH * stride_ly)
    runs = tl.load(band + row_off[:, None] + px[None, :] * stride_lx,
                   mask=(rows < n_rows)[:, None] & (px < PATCH * grid_w)[None, :])
    if PATCH == 1:
        tokens = tl.trans(runs)
    else:
        tokens = tl.reshape(tl.permute(tl.reshape(runs, (BLOCK_R, BLOCK_M, 2)), (1, 0, 2)), (BLOCK_M, 2 * BLOCK_R))
    tx = tx0 + tl.arange(0, BLOCK_M)
    feats = tl.program_id(1) * (PATCH * BLOCK_R) + tl.arange(0, PATCH * BLOCK_R)
    token_index = tl.program_id(2).to(tl.int64) * n_tokens + ty * grid_w + tx
    tl.store(packed_ptr + token_index[:, None] * stride_pn + feats[None, :], tokens,
             mask=(tx < grid_w)[:, None] & (feats < PATCH * n_rows)[None, :])
    if TAIL > 0:
        if tl.program_id(1) == 0:
            extra = tl.arange(0, TAIL)
            ones = tl.broadcast_to(tl.where(extra == 0, 1.0, 0.0)[None, :], (BLOCK_M, TAIL))
            tl.store(packed_ptr + token_index[:, None] * stride_pn + PATCH * n_rows + extra[None, :],
                     ones.to(packed_ptr.dtype.element_ty),
                     mask=(tx < grid_w)[:, None] & (extra < tail_cols)[None, :])


@triton.jit
def patch_unpack_kernel(
    packed_ptr, latent_ptr,
    grid_w, n_rows, n_tokens,
    stride_pn,
    stride_lb, stride_lc, stride_ly, stride_lx,
    PATCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """patch_pack_kernel's inverse (FLUX `_unpack_latents`): whole token rows in, whole pixel runs out. Same grid."""
    row_blocks = tl.cdiv(grid_w, BLOCK_M)
    ty = tl.program_id(0) // row_blocks
    tx0 = (tl.program_id(0) % row_blocks) * BLOCK_M
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    tx = tx0 + tl.arange(0, BLOCK_M)
    feats = tl.program_id(1) * (PATCH * BLOCK_R) + tl.arange(0, PATCH * BLOCK_R)
    token_index = tl.program_id(2).to(tl.int64) * n_tokens + ty * grid_w + tx
    tokens = tl.load(packed_ptr + token_index[:, None] * stride_pn + feats[None, :],
                     mask=(tx < grid_w)[:, None] & (feats < PATCH * n_rows)[None, :])
    if PATCH == 1:
        runs = tl.trans(tokens)
    else:
        runs = tl.reshape(tl.permute(tl.reshape(tokens, (BLOCK_M, BLOCK_R, 2)), (1, 0, 2)), (BLOCK_R, 2 * BLOCK_M))
    row_off = (rows // PATCH) * stride_lc + (rows % PATCH) * stride_ly
    px = tx0 * PATCH + tl.arange(0, PATCH * BLOCK_M)
    batch = tl.program_id(2).to(tl.int64)
    band = latent_ptr + batch * stride_lb + ty * (PATCH * stride_ly)
    tl.store(band + row_off[:, None] + px[None, :] * stride_lx, runs,
             mask=(rows < n_rows)[:, None] & (px < PATCH * grid_w)[None, :])
