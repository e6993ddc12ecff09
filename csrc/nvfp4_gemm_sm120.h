// nvfp4_gemm_sm120: W4A4 NVFP4 GEMM on Blackwell RTX (sm_120a) with the native block-scaled FP4 MMA.
// Plain C++ interface (no CUDA or torch types) so bindings.cpp compiles with the host compiler alone.
#pragma once

#include <cstdint>

namespace dcgen {

struct Nvfp4GemmParams {
  const uint8_t* a;         // [M, K/2] E2M1 codes, two per byte, low nibble = even k (row-major, contiguous)
  const uint8_t* a_scales;  // [M, K/16] E4M3 group scales (bytes)
  const uint8_t* w;         // [N, K/2] weight codes (nn.Linear rows)
  const uint8_t* w_scales;  // [N, K/16]
  const float* a_global;    // device scalar: activation tensor scale
  const float* w_global;    // device scalar: weight tensor scale
  const float* lora_act;    // [M, R] fp32, or nullptr when R == 0
  const void* lora_up;      // [R, N] in the output dtype, or nullptr
  const void* bias;         // [N] in the output dtype, or nullptr
  void* out;                // [M, N] contiguous, dtype `dtype`
  int64_t M, N, K, R;       // K: padded K, a multiple of 64
  int dtype;                // DType of out / lora_up / bias (0 float32, 1 bfloat16, 2 float16)
};

// Defined only in builds that include sm_120a (CMake then defines DCGEN_WITH_SM120_NVFP4 for bindings.cpp).
// Launches on `stream` (a cudaStream_t); returns a cudaError_t value (0 = success).
int nvfp4_gemm_sm120_launch(const Nvfp4GemmParams& p, void* stream);

// The same kernel on host memory (every build): its per-lane fragment loads and epilogue, with the MMA
// emulated from the PTX ISA fragment tables (nvfp4_gemm_sm120_emulate.cu).
void nvfp4_gemm_sm120_host(const Nvfp4GemmParams& p);

}  // namespace dcgen
