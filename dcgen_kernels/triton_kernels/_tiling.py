"""Tile-order helpers shared by the GEMM kernels."""

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(tile_m, tile_n) of program `pid` in grouped order: GROUP_M row tiles run down each column tile before the
    next one, so neighbouring programs share a weight tile while it is in L2."""
    n_tiles_m = tl.cdiv(M, BLOCK_M)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_tiles_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(n_tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % (GROUP_M * n_tiles_n)) % group_size
    tile_n = (pid % (GROUP_M * n_tiles_n)) // group_size
    return tile_m, tile_n
