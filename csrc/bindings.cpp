// pybind11 module dcgen_kernels._C. No torch headers: tensors arrive as raw pointers (tensor.data_ptr()),
// sizes and element strides; the stream as an integer (torch.cuda.current_stream().cuda_stream).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "nvfp4_gemm_sm120.h"
#include "qk_norm_rope.h"

#ifndef DCGEN_COMPILED_ARCHS
#define DCGEN_COMPILED_ARCHS ""
#endif

namespace py = pybind11;

namespace {

std::string cuda_error_text(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

std::vector<std::string> compiled_archs() {
  std::vector<std::string> out;
  std::string all = DCGEN_COMPILED_ARCHS, cur;
  for (char c : all) {
    if (c == ',') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

int cuda_runtime_version() {
  int v = 0;
  cudaError_t err = cudaRuntimeGetVersion(&v);
  if (err != cudaSuccess) throw std::runtime_error("cudaRuntimeGetVersion failed: " + cuda_error_text(err));
  return v;
}

// 0 when there is no usable driver or GPU (e.g. cudaErrorInsufficientDriver = 35 on a CPU machine).
int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear, so a later call is not poisoned
    return 0;
  }
  return n;
}

py::dict device_properties(int index) {
  cudaDeviceProp prop;
  cudaError_t err = cudaGetDeviceProperties(&prop, index);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error("cudaGetDeviceProperties(" + std::to_string(index) + ") failed: " + cuda_error_text(err));
  }
  py::dict d;
  d["name"] = std::string(prop.name);
  d["major"] = prop.major;
  d["minor"] = prop.minor;
  d["multiprocessor_count"] = prop.multiProcessorCount;
  d["total_memory"] = static_cast<int64_t>(prop.totalGlobalMem);
  d["l2_cache_bytes"] = static_cast<int64_t>(prop.l2CacheSize);
  return d;
}

dcgen::QkNormRopeParams make_params(uintptr_t x_ptr, uintptr_t weight_ptr, uintptr_t cos_ptr, uintptr_t sin_ptr,
                                    uintptr_t out_ptr, int64_t B, int64_t S, int64_t H, int64_t D, int64_t xsb,
                                    int64_t xss, int64_t xsh, int64_t osb, int64_t oss, int64_t osh,
                                    int64_t rope_offset, double eps, int dtype) {
  if (dtype != dcgen::kFloat32 && dtype != dcgen::kBFloat16 && dtype != dcgen::kFloat16)
    throw py::value_error("qk_norm_rope: unknown dtype code " + std::to_string(dtype) +
                          " (0 = float32, 1 = bfloat16, 2 = float16)");
  if (D < 2 || D > dcgen::kQkNormRopeMaxHeadDim || D % 2 != 0)
    throw py::value_error("qk_norm_rope: head dim D must be even and in [2, " +
                          std::to_string(dcgen::kQkNormRopeMaxHeadDim) + "], got " + std::to_string(D));
  if (B < 0 || S < 0 || H < 0)
    throw py::value_error("qk_norm_rope: B, S, H must be >= 0, got " + std::to_string(B) + ", " + std::to_string(S) +
                          ", " + std::to_string(H));
  if ((cos_ptr == 0) != (sin_ptr == 0))
    throw py::value_error("qk_norm_rope: cos_ptr and sin_ptr must both be 0 (no RoPE) or both non-zero");
  if (rope_offset < 0) throw py::value_error("qk_norm_rope: rope_offset must be >= 0, got " + std::to_string(rope_offset));
  if (!(eps >= 0.0) || !std::isfinite(eps))
    throw py::value_error("qk_norm_rope: eps must be finite and >= 0, got " + std::to_string(eps));
  if (B * S * H > 0 && (x_ptr == 0 || out_ptr == 0))
    throw py::value_error("qk_norm_rope: x_ptr and out_ptr must be non-zero");

  dcgen::QkNormRopeParams p;
  p.x = reinterpret_cast<const void*>(x_ptr);
  p.weight = reinterpret_cast<const float*>(weight_ptr);
  p.cos = reinterpret_cast<const float*>(cos_ptr);
  p.sin = reinterpret_cast<const float*>(sin_ptr);
  p.out = reinterpret_cast<void*>(out_ptr);
  p.B = B, p.S = S, p.H = H, p.D = D;
  p.xsb = xsb, p.xss = xss, p.xsh = xsh;
  p.osb = osb, p.oss = oss, p.osh = osh;
  p.rope_offset = rope_offset;
  p.eps = static_cast<float>(eps);
  p.dtype = dtype;
  return p;
}

void qk_norm_rope(uintptr_t x_ptr, uintptr_t weight_ptr, uintptr_t cos_ptr, uintptr_t sin_ptr, uintptr_t out_ptr,
                  int64_t B, int64_t S, int64_t H, int64_t D, int64_t xsb, int64_t xss, int64_t xsh, int64_t osb,
                  int64_t oss, int64_t osh, int64_t rope_offset, double eps, int dtype, uintptr_t stream) {
  const auto p = make_params(x_ptr, weight_ptr, cos_ptr, sin_ptr, out_ptr, B, S, H, D, xsb, xss, xsh, osb, oss, osh,
                             rope_offset, eps, dtype);
  const auto err = static_cast<cudaError_t>(dcgen::qk_norm_rope_launch(p, reinterpret_cast<void*>(stream)));
  if (err != cudaSuccess) throw std::runtime_error("qk_norm_rope: kernel launch failed: " + cuda_error_text(err));
}

void qk_norm_rope_host(uintptr_t x_ptr, uintptr_t weight_ptr, uintptr_t cos_ptr, uintptr_t sin_ptr,
                       uintptr_t out_ptr, int64_t B, int64_t S, int64_t H, int64_t D, int64_t xsb, int64_t xss,
                       int64_t xsh, int64_t osb, int64_t oss, int64_t osh, int64_t rope_offset, double eps,
                       int dtype) {
  const auto p = make_params(x_ptr, weight_ptr, cos_ptr, sin_ptr, out_ptr, B, S, H, D, xsb, xss, xsh, osb, oss, osh,
                             rope_offset, eps, dtype);
  py::gil_scoped_release release;
  dcgen::qk_norm_rope_host(p);
}

bool nvfp4_gemm_sm120_compiled() {
#ifdef DCGEN_WITH_SM120_NVFP4
  return true;
#else
  return false;
#endif
}

dcgen::Nvfp4GemmParams make_nvfp4_params(uintptr_t a_ptr, uintptr_t a_scales_ptr, uintptr_t w_ptr,
                                          uintptr_t w_scales_ptr, uintptr_t a_global_ptr, uintptr_t w_global_ptr,
                                          uintptr_t lora_act_ptr, uintptr_t lora_up_ptr, uintptr_t bias_ptr,
                                          uintptr_t out_ptr, int64_t M, int64_t N, int64_t K, int64_t R,
                                          int dtype) {
  if (dtype != dcgen::kFloat32 && dtype != dcgen::kBFloat16 && dtype != dcgen::kFloat16)
    throw py::value_error("nvfp4_gemm_sm120: unknown dtype code " + std::to_string(dtype) +
                          " (0 = float32, 1 = bfloat16, 2 = float16)");
  if (M < 0 || N < 0 || R < 0 || K <= 0 || K % 64 != 0)
    throw py::value_error("nvfp4_gemm_sm120: need M, N, R >= 0 and K a positive multiple of 64, got M=" +
                          std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K) +
                          " R=" + std::to_string(R));
  if (R > 0 && (lora_act_ptr == 0 || lora_up_ptr == 0))
    throw py::value_error("nvfp4_gemm_sm120: R > 0 needs lora_act_ptr and lora_up_ptr");
  if (M * N > 0 && (a_ptr == 0 || a_scales_ptr == 0 || w_ptr == 0 || w_scales_ptr == 0 || a_global_ptr == 0 ||
                    w_global_ptr == 0 || out_ptr == 0))
    throw py::value_error("nvfp4_gemm_sm120: operand pointers must be non-zero");
  if ((a_ptr | w_ptr | a_scales_ptr | w_scales_ptr) % 4 != 0)
    throw py::value_error("nvfp4_gemm_sm120: packed data and scale pointers must be 4-byte aligned");
  dcgen::Nvfp4GemmParams p;
  p.a = reinterpret_cast<const uint8_t*>(a_ptr);
  p.a_scales = reinterpret_cast<const uint8_t*>(a_scales_ptr);
  p.w = reinterpret_cast<const uint8_t*>(w_ptr);
  p.w_scales = reinterpret_cast<const uint8_t*>(w_scales_ptr);
  p.a_global = reinterpret_cast<const float*>(a_global_ptr);
  p.w_global = reinterpret_cast<const float*>(w_global_ptr);
  p.lora_act = reinterpret_cast<const float*>(lora_act_ptr);
  p.lora_up = reinterpret_cast<const void*>(lora_up_ptr);
  p.bias = reinterpret_cast<const void*>(bias_ptr);
  p.out = reinterpret_cast<void*>(out_ptr);
  p.M = M, p.N = N, p.K = K, p.R = R;
  p.dtype = dtype;
  return p;
}

void nvfp4_gemm_sm120(uintptr_t a_ptr, uintptr_t a_scales_ptr, uintptr_t w_ptr, uintptr_t w_scales_ptr,
                      uintptr_t a_global_ptr, uintptr_t w_global_ptr, uintptr_t lora_act_ptr, uintptr_t lora_up_ptr,
                      uintptr_t bias_ptr, uintptr_t out_ptr, int64_t M, int64_t N, int64_t K, int64_t R, int dtype,
                      uintptr_t stream) {
  if (!nvfp4_gemm_sm120_compiled())
    throw std::runtime_error("nvfp4_gemm_sm120: _C was not compiled for sm_120a (build with DCGEN_CUDA_ARCHS "
                             "including 120a)");
  const auto p = make_nvfp4_params(a_ptr, a_scales_ptr, w_ptr, w_scales_ptr, a_global_ptr, w_global_ptr,
                                   lora_act_ptr, lora_up_ptr, bias_ptr, out_ptr, M, N, K, R, dtype);
#ifdef DCGEN_WITH_SM120_NVFP4
  const auto err = static_cast<cudaError_t>(dcgen::nvfp4_gemm_sm120_launch(p, reinterpret_cast<void*>(stream)));
  if (err != cudaSuccess) throw std::runtime_error("nvfp4_gemm_sm120: kernel launch failed: " + cuda_error_text(err));
#else
  (void)p;
  (void)stream;
#endif
}

void nvfp4_gemm_sm120_host(uintptr_t a_ptr, uintptr_t a_scales_ptr, uintptr_t w_ptr, uintptr_t w_scales_ptr,
                           uintptr_t a_global_ptr, uintptr_t w_global_ptr, uintptr_t lora_act_ptr,
                           uintptr_t lora_up_ptr, uintptr_t bias_ptr, uintptr_t out_ptr, int64_t M, int64_t N,
                           int64_t K, int64_t R, int dtype) {
  const auto p = make_nvfp4_params(a_ptr, a_scales_ptr, w_ptr, w_scales_ptr, a_global_ptr, w_global_ptr,
                                   lora_act_ptr, lora_up_ptr, bias_ptr, out_ptr, M, N, K, R, dtype);
  py::gil_scoped_release release;
  dcgen::nvfp4_gemm_sm120_host(p);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dcgen_kernels CUDA kernels (raw-pointer bindings; see dcgen_kernels.ops for the torch API)";

  m.def("compiled_archs", &compiled_archs, "CUDA architectures compiled into this module, e.g. ['90a', '120a'].");
  m.def("cuda_runtime_version", &cuda_runtime_version, "CUDA runtime version this module links (e.g. 13000).");
  m.def("device_count", &device_count, "Number of visible CUDA devices; 0 when there is no driver or GPU.");
  m.def("device_properties", &device_properties, py::arg("index"),
        "dict(name, major, minor, multiprocessor_count, total_memory, l2_cache_bytes); RuntimeError on failure.");

  const char* kQkDoc =
      "Per-head RMSNorm (fp32 math, optional fp32 weight [D]) then FLUX RoPE (optional fp32 cos/sin "
      "[rows, D], row rope_offset + s) on x[b, s, h, :D] -> out. Strides in elements, last dim contiguous. "
      "dtype: 0 float32, 1 bfloat16, 2 float16 (x, out). Pass 0 for an absent weight/cos/sin.";
  m.def("qk_norm_rope", &qk_norm_rope, py::arg("x_ptr"), py::arg("weight_ptr"), py::arg("cos_ptr"),
        py::arg("sin_ptr"), py::arg("out_ptr"), py::arg("B"), py::arg("S"), py::arg("H"), py::arg("D"),
        py::arg("xsb"), py::arg("xss"), py::arg("xsh"), py::arg("osb"), py::arg("oss"), py::arg("osh"),
        py::arg("rope_offset"), py::arg("eps"), py::arg("dtype"), py::arg("stream"),
        (std::string(kQkDoc) + " Launches on `stream` (cudaStream_t as int) with device pointers.").c_str());
  m.def("qk_norm_rope_host", &qk_norm_rope_host, py::arg("x_ptr"), py::arg("weight_ptr"), py::arg("cos_ptr"),
        py::arg("sin_ptr"), py::arg("out_ptr"), py::arg("B"), py::arg("S"), py::arg("H"), py::arg("D"),
        py::arg("xsb"), py::arg("xss"), py::arg("xsh"), py::arg("osb"), py::arg("oss"), py::arg("osh"),
        py::arg("rope_offset"), py::arg("eps"), py::arg("dtype"),
        (std::string(kQkDoc) + " Runs the kernel's row math on the CPU with host pointers.").c_str());

  m.def("nvfp4_gemm_sm120_compiled", &nvfp4_gemm_sm120_compiled,
        "True when this build contains the sm_120a NVFP4 GEMM (native block-scaled FP4 MMA).");
  m.def("nvfp4_gemm_sm120", &nvfp4_gemm_sm120, py::arg("a_ptr"), py::arg("a_scales_ptr"), py::arg("w_ptr"),
        py::arg("w_scales_ptr"), py::arg("a_global_ptr"), py::arg("w_global_ptr"), py::arg("lora_act_ptr"),
        py::arg("lora_up_ptr"), py::arg("bias_ptr"), py::arg("out_ptr"), py::arg("M"), py::arg("N"), py::arg("K"),
        py::arg("R"), py::arg("dtype"), py::arg("stream"),
        "W4A4 NVFP4 GEMM on sm_120a: out[M, N] = A[M, K] W[N, K]^T * a_global * w_global + lora_act[M, R] "
        "lora_up[R, N] + bias[N]. A/W: packed E2M1 bytes [rows, K/2] and E4M3 scale bytes [rows, K/16], "
        "contiguous; K a multiple of 64; globals: device fp32 scalars; lora_act fp32; lora_up, bias, out in "
        "`dtype` (0 float32, 1 bfloat16, 2 float16). Pass 0 for absent lora/bias. RuntimeError when _C was not "
        "compiled for sm_120a.");
  m.def("nvfp4_gemm_sm120_host", &nvfp4_gemm_sm120_host, py::arg("a_ptr"), py::arg("a_scales_ptr"),
        py::arg("w_ptr"), py::arg("w_scales_ptr"), py::arg("a_global_ptr"), py::arg("w_global_ptr"),
        py::arg("lora_act_ptr"), py::arg("lora_up_ptr"), py::arg("bias_ptr"), py::arg("out_ptr"), py::arg("M"),
        py::arg("N"), py::arg("K"), py::arg("R"), py::arg("dtype"),
        "nvfp4_gemm_sm120 on host memory (every build): the kernel's per-lane fragment loads and epilogue with "
        "the MMA emulated from the PTX ISA fragment tables.");
}
