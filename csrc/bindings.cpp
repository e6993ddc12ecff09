// pybind11 module dcgen_kernels._C. No torch headers: tensors arrive as raw pointers (tensor.data_ptr()),
// sizes and element strides; the stream as an integer (torch.cuda.current_stream().cuda_stream).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

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
  p.weight = reinterpret_cast<const void*>(weight_ptr);
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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dcgen_kernels CUDA kernels (raw-pointer bindings; see dcgen_kernels.ops for the torch API)";

  m.def("compiled_archs", &compiled_archs, "CUDA architectures compiled into this module, e.g. ['90a', '120a'].");
  m.def("cuda_runtime_version", &cuda_runtime_version, "CUDA runtime version this module links (e.g. 13000).");
  m.def("device_count", &device_count, "Number of visible CUDA devices; 0 when there is no driver or GPU.");
  m.def("device_properties", &device_properties, py::arg("index"),
        "dict(name, major, minor, multiprocessor_count, total_memory, l2_cache_bytes); RuntimeError on failure.");

  const char* kQkDoc =
      "Per-head RMSNorm (fp32 math, optional weight in x's dtype) then FLUX RoPE (optional fp32 cos/sin "
      "[rows, D], row rope_offset + s) on x[b, s, h, :D] -> out. Strides in elements, last dim contiguous. "
      "dtype: 0 float32, 1 bfloat16, 2 float16 (x, weight, out). Pass 0 for an absent weight/cos/sin.";
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
}
