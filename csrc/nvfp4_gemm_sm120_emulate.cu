// Host emulation of the sm_120a NVFP4 GEMM (nvfp4_gemm_sm120.cu): the kernel's own per-lane fragment loads and
// epilogue (nvfp4_gemm_sm120_fragments.cuh), with the warp-level MMA replaced by one written from the PTX ISA
// tables (m16n8k64 .e2m1 fragments; block-scale selectors byte-id 0, thread-id 0). It checks on any machine
// that the kernel hands each lane the data the instruction expects; the instruction itself runs only on an
// sm_120 GPU. Compiled for every build (host code only).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "nvfp4_gemm_sm120.h"
#include "nvfp4_gemm_sm120_fragments.cuh"
#include "qk_norm_rope.h"  // DType codes

namespace dcgen {
namespace {

using namespace nvfp4;

double e2m1_value(uint32_t code) {
  static const double kMagnitude[8] = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0};
  return (code & 8 ? -1.0 : 1.0) * kMagnitude[code & 7];
}

double ue4m3_value(uint32_t byte) {
  const uint32_t exponent = (byte >> 3) & 0xF, mantissa = byte & 7;
  if ((byte & 0x7F) == 0x7F) return NAN;
  return exponent == 0 ? std::ldexp(mantissa / 8.0, -6) : std::ldexp(1.0 + mantissa / 8.0, int(exponent) - 7);
}

uint32_t nibble(uint32_t reg, int index) { return (reg >> (4 * index)) & 0xF; }
uint32_t byte_of(uint32_t reg, int index) { return (reg >> (8 * index)) & 0xFF; }

// D += (A * scale_A)(B * scale_B) for m16 tile i and n8 tile j of one warp, from all 32 lanes' registers.
void emulate_mma(const std::vector<LaneFragments>& lanes, int i, int j, std::vector<float>& acc) {
  for (int row = 0; row < 16; ++row) {
    for (int n = 0; n < 8; ++n) {
      double sum = 0.0;
      for (int k = 0; k < 64; ++k) {
        // A: lane (row % 8) * 4 + (k % 32) / 8, register (row >= 8) + 2 * (k >= 32), element k % 8.
        const auto& la = lanes[(row % 8) * 4 + (k % 32) / 8];
        const double a = e2m1_value(nibble(la.a[i][(row >= 8) + 2 * (k >= 32)], k % 8));
        // B: lane n * 4 + (k % 32) / 8, register (k >= 32), element k % 8.
        const auto& lb = lanes[n * 4 + (k % 32) / 8];
        const double b = e2m1_value(nibble(lb.b[j][k >= 32], k % 8));
        // scale_A[row][k / 16]: lane (row % 8) * 4 + (row >= 8) (thread-id-a 0); scale_B: lane n * 4.
        const double sa = ue4m3_value(byte_of(lanes[(row % 8) * 4 + (row >= 8)].scale_a[i], k / 16));
        const double sb = ue4m3_value(byte_of(lanes[n * 4].scale_b[j], k / 16));
        sum += a * sa * b * sb;
      }
      // D: lane (row % 8) * 4 + n / 2, register 2 * (row >= 8) + n % 2.
      const int lane = (row % 8) * 4 + n / 2, reg = 2 * (row >= 8) + n % 2;
      acc[((lane * kMTiles + i) * kNTiles + j) * 4 + reg] += static_cast<float>(sum);
    }
  }
}

template <typename T>
void run(const Nvfp4GemmParams& p) {
  const int64_t blocks_m = (p.M + kBlockM - 1) / kBlockM, blocks_n = (p.N + kBlockN - 1) / kBlockN;
  std::vector<LaneFragments> lanes(32);
  std::vector<float> acc(32 * kMTiles * kNTiles * 4);
  for (int64_t bm = 0; bm < blocks_m; ++bm) {
    for (int64_t bn = 0; bn < blocks_n; ++bn) {
      for (int warp = 0; warp < kWarps; ++warp) {
        int64_t row0, col0;
        warp_origin(bm, bn, warp, row0, col0);
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t k0 = 0; k0 < p.K; k0 += kStepK) {
          for (int lane = 0; lane < 32; ++lane) load_fragments(p, row0, col0, k0, lane, lanes[lane]);
          for (int i = 0; i < kMTiles; ++i)
            for (int j = 0; j < kNTiles; ++j) emulate_mma(lanes, i, j, acc);
        }
        for (int lane = 0; lane < 32; ++lane) {
          float lane_acc[kMTiles][kNTiles][4];
          std::copy_n(acc.data() + lane * kMTiles * kNTiles * 4, kMTiles * kNTiles * 4, &lane_acc[0][0][0]);
          store_outputs<T>(p, row0, col0, lane, lane_acc);
        }
      }
    }
  }
}

}  // namespace

void nvfp4_gemm_sm120_host(const Nvfp4GemmParams& p) {
  switch (p.dtype) {
    case kFloat32: return run<float>(p);
    case kBFloat16: return run<__nv_bfloat16>(p);
    case kFloat16: return run<__half>(p);
    default: return;
  }
}

}  // namespace dcgen
