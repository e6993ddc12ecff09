// qk_norm_rope: per-head RMSNorm (fp32 math) followed by FLUX RoPE, on rows x[b, s, h, 0:D].
// Plain C++ interface (no CUDA or torch types) so bindings.cpp compiles with the host compiler alone.
#pragma once

#include <cstdint>

namespace dcgen {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr int kQkNormRopeMaxHeadDim = 256;

struct QkNormRopeParams {
  const void* x;       // [B, S, H, D], strides in elements, last dim contiguous
  const float* weight; // [D] fp32, or nullptr (no affine)
  const float* cos;    // [rows, D] fp32 contiguous, or nullptr (no RoPE)
  const float* sin;    // same shape as cos
  void* out;           // [B, S, H, D], strides in elements, last dim contiguous
  int64_t B, S, H, D;
  int64_t xsb, xss, xsh;
  int64_t osb, oss, osh;
  int64_t rope_offset;  // row of cos/sin used for s = 0
  float eps;
  int dtype;  // DType
};

// Launches on `stream` (a cudaStream_t); returns a cudaError_t value (0 = success).
int qk_norm_rope_launch(const QkNormRopeParams& p, void* stream);

// Same per-row computation on host memory (the kernel's row math, compiled for the host).
void qk_norm_rope_host(const QkNormRopeParams& p);

}  // namespace dcgen
