// qk_norm_rope: one warp per (b, s, h) row; lane `l` owns the CHUNK contiguous elements starting at l*CHUNK
// (CHUNK = D/32 rounded up to even, so each RoPE pair stays in one lane). Memory-bound: one read of x, one
// write of out. A warp takes kHeadsPerWarp heads of one token: their cos/sin chunk is loaded once (otherwise
// the fp32 tables cost 4x the L2 traffic of bf16 x), and the heads' loads are all issued before the first
// reduction, for more bytes in flight.
//
// The row math (load + sum of squares, then scale + weight + RoPE + store) is __host__ __device__ and is
// reused verbatim by qk_norm_rope_host; only the cross-lane sum differs in mechanism (shuffles vs a loop),
// and the host loop reproduces the shuffle butterfly's order, so the two paths agree bit for bit
// (the build disables FMA contraction on both sides).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "qk_norm_rope.h"

namespace dcgen {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kHeadsPerWarp = 4;

// ---------------------------------------------------------------------------------------------- conversions
template <typename T> __host__ __device__ inline float to_float(T v);
template <> __host__ __device__ inline float to_float<float>(float v) { return v; }
template <> __host__ __device__ inline float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __host__ __device__ inline float to_float<__half>(__half v) { return __half2float(v); }

// Round to nearest even, like torch's .to(dtype).
template <typename T> __host__ __device__ inline T from_float(float v);
template <> __host__ __device__ inline float from_float<float>(float v) { return v; }
template <> __host__ __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __host__ __device__ inline __half from_float<__half>(float v) { return __float2half_rn(v); }

// ---------------------------------------------------------------------------------------------- chunk I/O
// VEC: every full chunk is aligned to its size (checked by the launcher), so the device loads it with
// 4/8/16-byte accesses. The host (and partial chunks) use element loops: same values, same math.
template <int BYTES> struct VecOf;
template <> struct VecOf<4> { using type = unsigned int; };
template <> struct VecOf<8> { using type = uint2; };
template <> struct VecOf<16> { using type = uint4; };

template <typename T, int N, bool VEC>
__host__ __device__ inline void load_chunk(const T* src, int n, T (&dst)[N]) {
#if defined(__CUDA_ARCH__)
  if constexpr (VEC) {
    if (n == N) {
      constexpr int kBytes = N * static_cast<int>(sizeof(T));
      constexpr int kPiece = kBytes < 16 ? kBytes : 16;
      static_assert(kBytes % kPiece == 0, "vector chunk must split into 4/8/16-byte pieces");
      using V = typename VecOf<kPiece>::type;
#pragma unroll
      for (int i = 0; i < kBytes / kPiece; ++i) {
        const V piece = reinterpret_cast<const V*>(src)[i];
        memcpy(reinterpret_cast<char*>(dst) + i * kPiece, &piece, kPiece);
      }
      return;
    }
  }
#endif
#pragma unroll
  for (int i = 0; i < N; ++i) dst[i] = i < n ? src[i] : from_float<T>(0.0f);
}

template <typename T, int N, bool VEC>
__host__ __device__ inline void store_chunk(T* dst, int n, const T (&src)[N]) {
#if defined(__CUDA_ARCH__)
  if constexpr (VEC) {
    if (n == N) {
      constexpr int kBytes = N * static_cast<int>(sizeof(T));
      constexpr int kPiece = kBytes < 16 ? kBytes : 16;
      using V = typename VecOf<kPiece>::type;
#pragma unroll
      for (int i = 0; i < kBytes / kPiece; ++i) {
        V piece;
        memcpy(&piece, reinterpret_cast<const char*>(src) + i * kPiece, kPiece);
        reinterpret_cast<V*>(dst)[i] = piece;
      }
      return;
    }
  }
#endif
#pragma unroll
  for (int i = 0; i < N; ++i)
    if (i < n) dst[i] = src[i];
}

// ---------------------------------------------------------------------------------------------- row math
// Elements of this lane's chunk that lie inside the row (even, possibly 0).
__host__ __device__ inline int chunk_len(int64_t D, int d0, int chunk) {
  const int64_t left = D - d0;
  return left <= 0 ? 0 : (left < chunk ? static_cast<int>(left) : chunk);
}

// Lane's weight chunk (fp32, as the reference multiplies; 1.0 without affine: multiplying by 1 is exact).
template <int CHUNK, bool VEC>
__host__ __device__ inline void lane_weight(const QkNormRopeParams& p, int d0, int n, float (&w)[CHUNK]) {
  if (p.weight != nullptr) {
    load_chunk<float, CHUNK, VEC>(p.weight + d0, n, w);
  } else {
#pragma unroll
    for (int i = 0; i < CHUNK; ++i) w[i] = 1.0f;
  }
}

// Phase 1: upcast the lane's elements; return their sum of squares (sequential, in element order).
template <typename T, int CHUNK, bool VEC>
__host__ __device__ inline float lane_load_sumsq(const T* xrow, int d0, int n, float (&v)[CHUNK]) {
  T raw[CHUNK];
  load_chunk<T, CHUNK, VEC>(xrow + d0, n, raw);
  float acc = 0.0f;
#pragma unroll
  for (int i = 0; i < CHUNK; ++i) {
    v[i] = to_float(raw[i]);
    acc += v[i] * v[i];
  }
  return acc;
}

// The lane's cos/sin chunk for token s (shared by all heads of that token). Only called with RoPE.
template <int CHUNK, bool VEC>
__host__ __device__ inline void lane_rope_tables(const QkNormRopeParams& p, int64_t s, int d0, int n,
                                                 float (&c)[CHUNK], float (&sn)[CHUNK]) {
  const int64_t crow = (p.rope_offset + s) * p.D + d0;
  load_chunk<float, CHUNK, VEC>(p.cos + crow, n, c);
  load_chunk<float, CHUNK, VEC>(p.sin + crow, n, sn);
}

// Phase 2 (after the cross-lane sum): normalise, weight, rotate pairs (d0+i, d0+i+1), store.
// c/sn are ignored without RoPE (p.cos == nullptr).
template <typename T, int CHUNK, bool VEC>
__host__ __device__ inline void lane_finish(const QkNormRopeParams& p, T* orow, int d0, int n,
                                            const float (&v)[CHUNK], const float (&w)[CHUNK],
                                            const float (&c)[CHUNK], const float (&sn)[CHUNK], float sumsq) {
  // 1/sqrt (IEEE sqrt and division; rsqrtf is approximate on the device).
  const float r = 1.0f / sqrtf(sumsq / static_cast<float>(p.D) + p.eps);
  float y[CHUNK];
#pragma unroll
  for (int i = 0; i < CHUNK; ++i) y[i] = v[i] * r * w[i];

  T res[CHUNK];
  if (p.cos != nullptr) {
    // diffusers apply_rotary_emb(use_real_unbind_dim=-1): x*cos + [-x_odd, x_even]*sin, per element.
#pragma unroll
    for (int i = 0; i < CHUNK; i += 2) {
      res[i] = from_float<T>(y[i] * c[i] - y[i + 1] * sn[i]);
      res[i + 1] = from_float<T>(y[i + 1] * c[i + 1] + y[i] * sn[i + 1]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < CHUNK; ++i) res[i] = from_float<T>(y[i]);
  }
  store_chunk<T, CHUNK, VEC>(orow + d0, n, res);
}

// ---------------------------------------------------------------------------------------------- device
// Work item = (b, s, group of kHeadsPerWarp heads), one per warp per iteration.
template <typename T, int CHUNK, bool VEC>
__global__ void __launch_bounds__(kWarpSize * kWarpsPerBlock) qk_norm_rope_kernel(const QkNormRopeParams p) {
  const int lane = threadIdx.x % kWarpSize;
  const int d0 = lane * CHUNK;
  const int n = chunk_len(p.D, d0, CHUNK);
  float w[CHUNK];
  lane_weight<CHUNK, VEC>(p, d0, n, w);  // row-independent: loaded once per warp

  const int64_t groups = (p.H + kHeadsPerWarp - 1) / kHeadsPerWarp;
  const int64_t n_items = p.B * p.S * groups;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  // `item` and `h` are warp-uniform, so the full-mask shuffles below are safe.
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
       item < n_items; item += stride) {
    const int64_t h0 = (item % groups) * kHeadsPerWarp;
    const int64_t bs = item / groups;
    const int64_t s = bs % p.S, b = bs / p.S;

    float c[CHUNK] = {}, sn[CHUNK] = {};
    if (p.cos != nullptr) lane_rope_tables<CHUNK, VEC>(p, s, d0, n, c, sn);

    float v[kHeadsPerWarp][CHUNK];
    float sumsq[kHeadsPerWarp];
#pragma unroll
    for (int k = 0; k < kHeadsPerWarp; ++k) {
      const T* xrow = static_cast<const T*>(p.x) + b * p.xsb + s * p.xss + (h0 + k) * p.xsh;
      sumsq[k] = h0 + k < p.H ? lane_load_sumsq<T, CHUNK, VEC>(xrow, d0, n, v[k]) : 0.0f;
    }
#pragma unroll
    for (int off = kWarpSize / 2; off > 0; off >>= 1) {
#pragma unroll
      for (int k = 0; k < kHeadsPerWarp; ++k) sumsq[k] += __shfl_xor_sync(0xffffffffu, sumsq[k], off);
    }
#pragma unroll
    for (int k = 0; k < kHeadsPerWarp; ++k) {
      if (h0 + k >= p.H) break;
      T* orow = static_cast<T*>(p.out) + b * p.osb + s * p.oss + (h0 + k) * p.osh;
      lane_finish<T, CHUNK, VEC>(p, orow, d0, n, v[k], w, c, sn, sumsq[k]);
    }
  }
}

// ---------------------------------------------------------------------------------------------- host
// Row by row, emulating the 32 lanes; per-row math identical to the kernel's.
template <typename T, int CHUNK>
void host_rows(const QkNormRopeParams& p) {
  float w[kWarpSize][CHUNK];
  int n[kWarpSize];
  for (int lane = 0; lane < kWarpSize; ++lane) {
    n[lane] = chunk_len(p.D, lane * CHUNK, CHUNK);
    lane_weight<CHUNK, false>(p, lane * CHUNK, n[lane], w[lane]);
  }
  float c[kWarpSize][CHUNK] = {}, sn[kWarpSize][CHUNK] = {};
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t s = 0; s < p.S; ++s) {
      if (p.cos != nullptr)
        for (int lane = 0; lane < kWarpSize; ++lane)
          lane_rope_tables<CHUNK, false>(p, s, lane * CHUNK, n[lane], c[lane], sn[lane]);
      for (int64_t h = 0; h < p.H; ++h) {
        const T* xrow = static_cast<const T*>(p.x) + b * p.xsb + s * p.xss + h * p.xsh;
        T* orow = static_cast<T*>(p.out) + b * p.osb + s * p.oss + h * p.osh;
        float v[kWarpSize][CHUNK];
        float part[kWarpSize];
        for (int lane = 0; lane < kWarpSize; ++lane)
          part[lane] = lane_load_sumsq<T, CHUNK, false>(xrow, lane * CHUNK, n[lane], v[lane]);
        // The xor-shuffle butterfly, step by step: lane l adds lane l^off's value.
        for (int off = kWarpSize / 2; off > 0; off >>= 1) {
          float next[kWarpSize];
          for (int lane = 0; lane < kWarpSize; ++lane) next[lane] = part[lane] + part[lane ^ off];
          std::memcpy(part, next, sizeof(part));
        }
        for (int lane = 0; lane < kWarpSize; ++lane)
          lane_finish<T, CHUNK, false>(p, orow, lane * CHUNK, n[lane], v[lane], w[lane], c[lane], sn[lane], part[lane]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------- dispatch
bool aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

// Can every full chunk use vector accesses? (base pointers and row strides aligned to the chunk size)
template <typename T, int CHUNK>
bool can_vectorize(const QkNormRopeParams& p) {
  constexpr int64_t kBytes = CHUNK * sizeof(T);
  constexpr int64_t kFloatBytes = CHUNK * sizeof(float);
  if (kBytes & (kBytes - 1)) return false;  // CHUNK 6: 12/24-byte chunks, scalar path
  const int64_t a = std::min<int64_t>(kBytes, 16), af = std::min<int64_t>(kFloatBytes, 16);
  const int64_t e = sizeof(T);
  bool ok = aligned(p.x, a) && aligned(p.out, a) && (p.weight == nullptr || aligned(p.weight, af));
  for (int64_t st : {p.xsb, p.xss, p.xsh, p.osb, p.oss, p.osh}) ok = ok && (st * e) % a == 0;
  if (p.cos != nullptr) ok = ok && aligned(p.cos, af) && aligned(p.sin, af) && (p.D * 4) % af == 0;
  return ok;
}

template <typename T, int CHUNK>
cudaError_t launch_typed(const QkNormRopeParams& p, cudaStream_t stream) {
  const int64_t n_items = p.B * p.S * ((p.H + kHeadsPerWarp - 1) / kHeadsPerWarp);
  if (n_items == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((n_items + kWarpsPerBlock - 1) / kWarpsPerBlock, int64_t{1} << 30);
  const dim3 grid(static_cast<unsigned>(blocks)), block(kWarpSize * kWarpsPerBlock);
  constexpr bool kPow2 = (CHUNK & (CHUNK - 1)) == 0;
  if (kPow2 && can_vectorize<T, CHUNK>(p))
    qk_norm_rope_kernel<T, CHUNK, kPow2><<<grid, block, 0, stream>>>(p);
  else
    qk_norm_rope_kernel<T, CHUNK, false><<<grid, block, 0, stream>>>(p);
  return cudaGetLastError();
}

// CHUNK = 2 * ceil(D / 64): 2, 4, 6 or 8 for even D <= 256 (the binding validates D).
template <typename Fn>
auto dispatch(const QkNormRopeParams& p, Fn&& fn) {
  const int chunk = static_cast<int>(2 * ((p.D + 63) / 64));
#define DCGEN_CHUNKS(T)                                        \
  switch (chunk) {                                             \
    case 2: return fn(T{}, std::integral_constant<int, 2>{});  \
    case 4: return fn(T{}, std::integral_constant<int, 4>{});  \
    case 6: return fn(T{}, std::integral_constant<int, 6>{});  \
    default: return fn(T{}, std::integral_constant<int, 8>{}); \
  }
  switch (p.dtype) {
    case kBFloat16: DCGEN_CHUNKS(__nv_bfloat16)
    case kFloat16: DCGEN_CHUNKS(__half)
    default: DCGEN_CHUNKS(float)
  }
#undef DCGEN_CHUNKS
}

}  // namespace

int qk_norm_rope_launch(const QkNormRopeParams& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return static_cast<int>(dispatch(p, [&](auto t, auto chunk) {
    return launch_typed<decltype(t), decltype(chunk)::value>(p, s);
  }));
}

void qk_norm_rope_host(const QkNormRopeParams& p) {
  dispatch(p, [&](auto t, auto chunk) { host_rows<decltype(t), decltype(chunk)::value>(p); });
}

}  // namespace dcgen
