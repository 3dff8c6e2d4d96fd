// Fused per-tensor update kernels for lomo-run (CPU), built on first use by
// torch.utils.cpp_extension.load. The pure-PyTorch versions in
// lomo_runtime/native.py are the fallback and the test reference.
//
// * sr_bf16: fp32 -> bf16 with stochastic rounding in one pass. The random
//   bits come from a counter-based hash (SplitMix64 of seed ^ index), so the
//   result depends only on (seed, element index): reproducible and identical
//   for any thread count. lomo_runtime/native.py's stochastic_round_bf16_torch
//   draws the same bits: change the two together.
// * adamw_: torch.optim.AdamW's update (decoupled decay, bias-corrected
//   moments) in one pass over param, grad and the two moments, instead of the
//   ~8 full-tensor passes the op-by-op version makes.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

inline uint16_t round_bf16(float value, uint32_t noise16) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  // Adding a uniform 16-bit integer and truncating rounds the magnitude up with
  // probability (low 16 bits) / 2^16: unbiased. Inf and NaN (exponent all ones) get no noise, so
  // inf stays inf; a NaN also gets the quiet bit, or one whose payload lies only in the low 16 bits
  // would truncate to inf.
  if ((bits & 0x7F800000u) == 0x7F800000u) {
    const uint16_t high = static_cast<uint16_t>(bits >> 16);
    return (bits & 0x007FFFFFu) ? static_cast<uint16_t>(high | 0x0040u) : high;
  }
  bits += noise16;
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace

void sr_bf16(torch::Tensor out, torch::Tensor in, int64_t seed) {
  TORCH_CHECK(in.scalar_type() == torch::kFloat32 && in.is_contiguous(), "sr_bf16: input must be contiguous fp32");
  TORCH_CHECK(out.scalar_type() == torch::kBFloat16 && out.is_contiguous(), "sr_bf16: output must be contiguous bf16");
  TORCH_CHECK(in.numel() == out.numel(), "sr_bf16: size mismatch");
  TORCH_CHECK(in.device().is_cpu() && out.device().is_cpu(), "sr_bf16: CPU tensors only");
  const float* src = in.data_ptr<float>();
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const uint64_t base = static_cast<uint64_t>(seed);
  at::parallel_for(0, in.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      uint32_t noise = static_cast<uint32_t>(splitmix64(base ^ (static_cast<uint64_t>(i) * 0xD1B54A32D192ED03ULL))) & 0xFFFFu;
      dst[i] = round_bf16(src[i], noise);
    }
  });
}

void adamw_(torch::Tensor param, torch::Tensor grad, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
            double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  for (const auto& t : {param, grad, exp_avg, exp_avg_sq}) {
    TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous(), "adamw_: tensors must be contiguous fp32");
    TORCH_CHECK(t.numel() == param.numel(), "adamw_: size mismatch");
  }
  float* p = param.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  const float decay = static_cast<float>(1.0 - lr * weight_decay);
  const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2);
  const float one_minus_b1 = static_cast<float>(1.0 - beta1), one_minus_b2 = static_cast<float>(1.0 - beta2);
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  const float step_size = static_cast<float>(lr / bc1);
  const float bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  const float e = static_cast<float>(eps);
  at::parallel_for(0, param.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float gi = g[i];
      float pi = p[i] * decay;
      const float mi = m[i] + one_minus_b1 * (gi - m[i]);           // lerp, as torch does
      const float vi = v[i] * b2 + one_minus_b2 * gi * gi;
      m[i] = mi;
      v[i] = vi;
      p[i] = pi - step_size * (mi / (std::sqrt(vi) / bc2_sqrt + e));
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sr_bf16", &sr_bf16, "fp32 -> bf16 stochastic rounding (seeded, counter-based)");
  m.def("adamw_", &adamw_, "fused in-place AdamW step on fp32 tensors");
}
