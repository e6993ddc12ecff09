// W4A4 NVFP4 GEMM for Blackwell RTX (sm_120a) on the native block-scaled FP4 tensor-core instruction
//
//   mma.sync.aligned.m16n8k64.row.col.kind::mxf4nvf4.block_scale.scale_vec::4X.f32.e2m1.e2m1.f32.ue4m3
//
// out[m, n] = a_global * w_global * sum_k A[m, k] W[n, k] + lora_act[m, :] . lora_up[:, n] + bias[n]
// with A, W in NVFP4 (E2M1 codes, one unsigned E4M3 scale per 16 k, applied by the MMA itself).
//
// Compiled only for sm_120a (CMakeLists.txt builds this file in its own object library for that arch; ptxas
// rejects the instruction for sm_90a and sm_100a). Status: compiled, not yet run on an sm_120 GPU.
//
// Register layouts of one m16n8k64 MMA (lane = 4 * group + tig, group = lane / 4, tig = lane % 4; a 32-bit
// register holds 8 consecutive k of one row, element i in bits 4i..4i+3 - exactly our packed byte order, so a
// fragment register is one aligned 4-byte load of a packed row):
//   A (16 x 64, row): a0 = row group,     k = 8 tig .. 8 tig + 7      a1 = row group + 8, same k
//                     a2 = row group,     k = 32 + 8 tig .. + 7       a3 = row group + 8, same k
//   B (64 x 8, col):  b0 = column group,  k = 8 tig .. 8 tig + 7      b1 = column group,  k = 32 + 8 tig .. + 7
//   C/D (16 x 8):     c0, c1 = row group, columns 2 tig, 2 tig + 1;   c2, c3 = row group + 8, same columns
// Scale factors, scale_vec::4X: four UE4M3 scales per row of A (and per column of B), one per 16 k of the 64,
// packed in one 32-bit register, byte j = k block j (byte-id selector 0: the register holds all four).
// Which lanes supply them is set by the thread-id selectors:
//   scale A (16 rows): thread-id-a = 0 -> the lanes with tig 0 and 1 of each group supply rows group (tig 0)
//                      and group + 8 (tig 1); thread-id-a = 1 would select tig 2 and 3 instead.
//   scale B (8 cols):  thread-id-b = t -> the lane with tig == t of each group supplies column `group`.
// (PTX ISA "Block Scaling for mma.sync"; the same lane assignment is documented in nunchaku's FP4 activation
// quantizer, "lane i => row i/4 + 8*(i%2) if i%4/2 == ida", and its weight-scale packer.)
// Our scale tensors are [rows, K/16] row-major, so the four scales of a 64-k step are one aligned 4-byte load.
// This kernel keeps every lane's registers filled with its own row/column's scales (selectors 0), so lanes
// that are not selected hold valid data too.
//
// Tiling (correctness first: fragments are loaded straight from global memory, through L1, with no shared-memory
// staging or software pipeline yet): a block of 2 x 2 warps computes 128 x 64 outputs; each warp a 64 x 32 tile
// = 4 x 4 MMAs per 64-k step, so every A fragment feeds 4 MMAs and every B fragment 4.
#include <cuda_runtime.h>

#include <cstdint>

#include "nvfp4_gemm_sm120.h"
#include "nvfp4_gemm_sm120_fragments.cuh"
#include "qk_norm_rope.h"  // DType codes

namespace dcgen {
namespace {

using namespace nvfp4;

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 1200) && defined(__CUDA_ARCH_FEAT_SM120_ALL)
#define DCGEN_NVFP4_MMA 1
#endif

__device__ inline void mma_nvfp4(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], uint32_t scale_a,
                                 uint32_t scale_b) {
#ifdef DCGEN_NVFP4_MMA
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.kind::mxf4nvf4.block_scale.scale_vec::4X.f32.e2m1.e2m1.f32.ue4m3 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3}, {%10}, {%11, %12}, {%13}, {%14, %15};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(scale_a), "n"(0), "h"((short)0),
        "r"(scale_b), "n"(0), "h"((short)0));
#else
  __trap();  // never launched: the host checks the build and the device arch first
#endif
}

template <typename T>
__global__ void __launch_bounds__(32 * kWarps) nvfp4_gemm_sm120_kernel(Nvfp4GemmParams p) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int64_t row0, col0;
  warp_origin(blockIdx.y, blockIdx.x, warp, row0, col0);
  float acc[kMTiles][kNTiles][4] = {};
  LaneFragments f;
  for (int64_t k0 = 0; k0 < p.K; k0 += kStepK) {
    load_fragments(p, row0, col0, k0, lane, f);
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
      for (int i = 0; i < kMTiles; ++i) mma_nvfp4(acc[i][j], f.a[i], f.b[j], f.scale_a[i], f.scale_b[j]);
    }
  }
  store_outputs<T>(p, row0, col0, lane, acc);
}

template <typename T>
cudaError_t launch(const Nvfp4GemmParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.N + kBlockN - 1) / kBlockN),
                  static_cast<unsigned>((p.M + kBlockM - 1) / kBlockM));
  nvfp4_gemm_sm120_kernel<T><<<grid, 32 * kWarps, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

int nvfp4_gemm_sm120_launch(const Nvfp4GemmParams& p, void* stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case kFloat32: return launch<float>(p, s);
    case kBFloat16: return launch<__nv_bfloat16>(p, s);
    case kFloat16: return launch<__half>(p, s);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace dcgen
