// Shared pieces of rlcore's compiled CPU backends (linear_logprobs_cpu.cpp, divergence_cpu.cpp): the vector ISA,
// the GEMMs (oneDNN through the dispatcher, else at::mm), transposed logit tiles and their per-lane helpers.
// Everything is inline in an anonymous namespace: each translation unit gets its own copy, compiled for its ISA.
#pragma once

// Vector ISA of at::vec, chosen from what the compiler targets (-march=native): before any ATen include.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#define RLCORE_VEC_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#define RLCORE_VEC_ISA "avx2"
#else
#define RLCORE_VEC_ISA "scalar"
#endif
// The namespace at::vec puts its inline functions in: ours, so they never merge with libtorch's own copies, which
// are compiled for other ISAs.
#define CPU_CAPABILITY rlcore_native

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
// exp(x) is exactly 0 in FP32 below about -104. Differences are clamped to this before they multiply an exponential
// of themselves, so that masked entries (-inf logits) give 0 * finite = 0 instead of 0 * -inf = NaN.
constexpr float kMinExpArg = -200.0f;
// Least number of vector-wide position groups a thread takes in an epilogue.
constexpr int64_t kGrainLanes = 4;

// ---------------------------------------------------------------------------------------------------------------------
// GEMMs
// ---------------------------------------------------------------------------------------------------------------------

using LinearPointwise = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                   c10::string_view, c10::List<std::optional<c10::Scalar>>,
                                   std::optional<c10::string_view>);

// oneDNN's linear (x @ w^T) as PyTorch registers it: present when torch was built with MKLDNN.
inline const std::optional<c10::TypedOperatorHandle<LinearPointwise>>& onednn_linear() {
  static const std::optional<c10::TypedOperatorHandle<LinearPointwise>> handle =
      []() -> std::optional<c10::TypedOperatorHandle<LinearPointwise>> {
    auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!op.has_value() || !op->hasKernelForDispatchKey(c10::DispatchKey::CPU)) {
      return std::nullopt;
    }
    return op->typed<LinearPointwise>();
  }();
  return handle;
}

inline bool onednn_available() { return onednn_linear().has_value(); }

inline bool use_onednn(bool requested, const at::Tensor& a, const at::Tensor& b) {
  // K = 0 or an empty operand: at::mm handles them (a zero or empty product); oneDNN need not.
  return requested && onednn_linear().has_value() && a.size(1) > 0 && a.numel() > 0 && b.numel() > 0;
}

// a [M, K] @ b [P, K]^T -> a new, contiguous FP32 [M, P]. Operands may be strided views.
inline at::Tensor mm_nt(const at::Tensor& a, const at::Tensor& b, bool onednn) {
  if (use_onednn(onednn, a, b)) {
    return onednn_linear()->call(a, b, std::nullopt, "none", c10::List<std::optional<c10::Scalar>>(), std::nullopt);
  }
  return at::mm(a, b.t());
}

// out [M, P] += a [M, K] @ b [P, K]^T. oneDNN's op has no accumulating form, so its product is added (an [M, P] pass,
// next to the 2 M P K flops of the product).
inline void mm_nt_acc(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool onednn) {
  if (use_onednn(onednn, a, b)) {
    out.add_(mm_nt(a, b, true));
  } else {
    out.addmm_(a, b.t());
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// Epilogues on a transposed logit tile zT [Vt, R] (row stride ld), positions as vector lanes
// ---------------------------------------------------------------------------------------------------------------------

struct Tile {
  float* z;             // zT, [vt, ld]; columns [0, rows) are this tile's positions
  int64_t ld;
  int64_t vt;           // vocabulary entries in the tile
  int64_t rows;         // positions in the tile
  int64_t v0;           // first vocabulary id of the tile
  const float* bias;    // [V] FP32, or nullptr
  float inv_temp;
  float softcap;        // c of cap(a) = c tanh(a / c); 0: no cap
};

inline Vec load(const float* p, int64_t n) { return n == kLanes ? Vec::loadu(p) : Vec::loadu(p, n); }
inline void store(const Vec& x, float* p, int64_t n) {
  if (n == kLanes) {
    x.store(p);
  } else {
    x.store(p, n);
  }
}
inline Vec clamp_exp_arg(const Vec& x) { return at::vec::maximum(x, Vec(kMinExpArg)); }

// Compensated (Kahan) addition of x to sum, comp holding the running compensation (true value: sum - comp).
inline void kahan_add(Vec& sum, Vec& comp, const Vec& x) {
  const Vec y = x - comp;
  const Vec t = sum + y;
  comp = (t - sum) - y;
  sum = t;
}

// The logit of vocabulary row j of the tile for lanes [c, c + n): cap(acc + b) / T. With a cap, `slope` (when not
// null) receives d cap(a) / d a = 1 - tanh(a / c)^2.
inline Vec logit(const Tile& t, int64_t j, int64_t c, int64_t n, Vec* slope = nullptr) {
  Vec x = load(t.z + j * t.ld + c, n);
  if (t.bias != nullptr) {
    x = x + Vec(t.bias[t.v0 + j]);
  }
  if (t.softcap > 0.0f) {
    const Vec th = (x / Vec(t.softcap)).tanh();
    if (slope != nullptr) {
      *slope = Vec(1.0f) - th * th;
    }
    x = th * Vec(t.softcap);
  }
  return x * Vec(t.inv_temp);
}

// Run `body(c0, c1)` on ranges of the tile's positions, in parallel: one contiguous range per thread, each starting
// on a vector boundary.
template <typename F>
inline void parallel_over_positions(int64_t rows, const F& body) {
  const int64_t groups = (rows + kLanes - 1) / kLanes;
  at::parallel_for(0, groups, kGrainLanes, [&](int64_t g0, int64_t g1) {
    body(g0 * kLanes, std::min(g1 * kLanes, rows));
  });
}

// The tile's slice [v0, v0 + vt) of the weight as a contiguous FP32 matrix (a view when it already is one).
inline at::Tensor weight_tile(const at::Tensor& weight, int64_t v0, int64_t vt) {
  return weight.narrow(0, v0, vt).to(at::kFloat).contiguous();
}

}  // namespace
