// Per-lane fragment loads and output stores of the sm_120a NVFP4 GEMM, shared by the device kernel
// (nvfp4_gemm_sm120.cu) and the host emulator (nvfp4_gemm_sm120_emulate.cu) that checks them on a CPU against
// an MMA written from the PTX ISA's fragment tables. The layout notes are in nvfp4_gemm_sm120.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "nvfp4_gemm_sm120.h"

namespace dcgen {
namespace nvfp4 {

constexpr int kWarpsM = 2, kWarpsN = 2;
constexpr int kWarps = kWarpsM * kWarpsN;
constexpr int kMTiles = 4;  // m16 tiles per warp
constexpr int kNTiles = 4;  // n8 tiles per warp
constexpr int kBlockM = kWarpsM * kMTiles * 16;
constexpr int kBlockN = kWarpsN * kNTiles * 8;
constexpr int kStepK = 64;

struct LaneFragments {
  uint32_t a[kMTiles][4];  // A registers of each m16 tile
  uint32_t scale_a[kMTiles];
  uint32_t b[kNTiles][2];  // B registers of each n8 tile
  uint32_t scale_b[kNTiles];
};

template <typename T> __host__ __device__ inline float load_as_float(const void* p, int64_t i);
template <> __host__ __device__ inline float load_as_float<float>(const void* p, int64_t i) {
  return static_cast<const float*>(p)[i];
}
template <> __host__ __device__ inline float load_as_float<__nv_bfloat16>(const void* p, int64_t i) {
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}
template <> __host__ __device__ inline float load_as_float<__half>(const void* p, int64_t i) {
  return __half2float(static_cast<const __half*>(p)[i]);
}
template <typename T> __host__ __device__ inline T store_from_float(float v);
template <> __host__ __device__ inline float store_from_float<float>(float v) { return v; }
template <> __host__ __device__ inline __nv_bfloat16 store_from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __host__ __device__ inline __half store_from_float<__half>(float v) { return __float2half_rn(v); }

__host__ __device__ inline uint32_t load_u32(const uint8_t* base, int64_t byte_offset, bool ok) {
  if (!ok) return 0u;
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const uint32_t*>(base + byte_offset);
#else
  uint32_t v;
  std::memcpy(&v, base + byte_offset, 4);  // little-endian host, like the GPU
  return v;
#endif
}

// Top-left output of warp `warp` in block (block_m, block_n).
__host__ __device__ inline void warp_origin(int64_t block_m, int64_t block_n, int warp, int64_t& row0,
                                            int64_t& col0) {
  row0 = block_m * kBlockM + (warp / kWarpsN) * (kMTiles * 16);
  col0 = block_n * kBlockN + (warp % kWarpsN) * (kNTiles * 8);
}

// This lane's A/B registers and scale registers for the 64-k step at k0.
__host__ __device__ inline void load_fragments(const Nvfp4GemmParams& p, int64_t row0, int64_t col0, int64_t k0,
                                               int lane, LaneFragments& f) {
  const int group = lane / 4, tig = lane % 4;
  const int64_t row_bytes = p.K / 2, scale_bytes = p.K / 16;
  const int64_t kb = k0 / 2 + tig * 4;  // byte offset of this lane's 8 k in the first half of the step
  for (int i = 0; i < kMTiles; ++i) {
    const int64_t lo = row0 + i * 16 + group, hi = lo + 8;
    f.a[i][0] = load_u32(p.a, lo * row_bytes + kb, lo < p.M);
    f.a[i][1] = load_u32(p.a, hi * row_bytes + kb, hi < p.M);
    f.a[i][2] = load_u32(p.a, lo * row_bytes + kb + 16, lo < p.M);
    f.a[i][3] = load_u32(p.a, hi * row_bytes + kb + 16, hi < p.M);
    // This lane supplies the A scales of row `group` (tig 0) or `group + 8` (tig 1).
    const int64_t scale_row = (tig & 1) ? hi : lo;
    f.scale_a[i] = load_u32(p.a_scales, scale_row * scale_bytes + k0 / 16, scale_row < p.M);
  }
  for (int j = 0; j < kNTiles; ++j) {
    const int64_t col = col0 + j * 8 + group;
    const bool col_ok = col < p.N;
    f.b[j][0] = load_u32(p.w, col * row_bytes + kb, col_ok);
    f.b[j][1] = load_u32(p.w, col * row_bytes + kb + 16, col_ok);
    f.scale_b[j] = load_u32(p.w_scales, col * scale_bytes + k0 / 16, col_ok);
  }
}

// Epilogue of this lane's accumulators: tensor scales, low-rank up-projection, bias, store.
template <typename T>
__host__ __device__ inline void store_outputs(const Nvfp4GemmParams& p, int64_t row0, int64_t col0, int lane,
                                              const float (&acc)[kMTiles][kNTiles][4]) {
  const int group = lane / 4, tig = lane % 4;
  const float tensor_scale = *p.a_global * *p.w_global;
  for (int i = 0; i < kMTiles; ++i) {
    for (int j = 0; j < kNTiles; ++j) {
      for (int e = 0; e < 4; ++e) {
        const int64_t row = row0 + i * 16 + group + (e < 2 ? 0 : 8);
        const int64_t col = col0 + j * 8 + tig * 2 + (e & 1);
        if (row >= p.M || col >= p.N) continue;
        float v = acc[i][j][e] * tensor_scale;
        for (int64_t r = 0; r < p.R; ++r)
          v += p.lora_act[row * p.R + r] * load_as_float<T>(p.lora_up, r * p.N + col);
        if (p.bias) v += load_as_float<T>(p.bias, col);
        static_cast<T*>(p.out)[row * p.N + col] = store_from_float<T>(v);
      }
    }
  }
}

}  // namespace nvfp4
}  // namespace dcgen
