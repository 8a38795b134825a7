// The compiled CPU backend of rlcore::linear_logprobs (forward) and rlcore::linear_logprobs_backward.
//
// Same math as rlcore/chunked.py and the Triton kernels: per-token log-probs, raw entropy and their gradients from
// hidden states h [N, H] and the head W [V, H], with logits z = cap(h W^T + b) / T that never exist as an [N, V]
// tensor; cap(a) = c tanh(a / c) with a soft cap c > 0 (Gemma 2/3), the identity with c = 0.
//
// Layout of the work. Both passes walk the vocabulary in tiles of Vt entries (outer loop) and the rows in tiles of R
// (inner loop). Each step is one GEMM that writes the logit tile transposed, zT [Vt, R] = W_t h_r^T (vocabulary-major:
// a row of zT holds one vocabulary entry for R consecutive positions), then an epilogue that reads the tile once while
// it is in cache:
//   forward   folds the tile into running per-position (max m, sum exp s, sum exp * (z - m) a) and picks the target
//             logit: an online log-sum-exp whose vector lanes are positions, so no horizontal reduction is needed;
//   backward  recomputes the tile, overwrites it with dz^T in place, and feeds it to two GEMMs:
//             dW_t += dz^T h_r (accumulated over the row tiles in an FP32 [Vt, H] tile, written once per vocabulary
//             tile in the weight's dtype) and dh_r += dz W_t (an FP32 [N, H] accumulator).
// Transposed tiles are what the fastest GEMM forms want here: oneDNN computes zT = W_t h_r^T and dW_t = dzT h_r at
// ~450 GFLOP/s on the development machine and dh_r = dzT^T W_t at ~400 (MKL's sgemm: ~200).
//
// Determinism: the tile order is fixed and every output element has one owner (the epilogue parallelises over
// positions, the GEMMs over their own output blocks), so results are bitwise reproducible for a thread count.
// Everything is indexed with int64; target ids are compared against the tile's range, never used as an address
// unless they fall inside it (the Python layer validates them before the call anyway).

#include "cpu_tiles.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace {

// Vocabulary entries folded per register block: 16 vectors of logits stay in registers between the block's max and
// its exponentials.
constexpr int64_t kBlock = 16;

// One lane of `logit`, through the same vector operations, so the target logit equals the one folded into the
// log-sum-exp bit for bit (a scalar tanh need not round like the vector one).
inline float logit_scalar(const Tile& t, int64_t j, int64_t c) {
  float out[kLanes];
  logit(t, j, c, 1).store(out, 1);
  return out[0];
}
// The slope of the cap at row j, lane c (1 without a cap): what the target's [v = t] term of dz is multiplied by.
inline float slope_scalar(const Tile& t, int64_t j, int64_t c) {
  if (t.softcap <= 0.0f) {
    return 1.0f;
  }
  Vec slope(1.0f);
  logit(t, j, c, 1, &slope);
  float out[kLanes];
  slope.store(out, 1);
  return out[0];
}


// Running per-position sums of the forward, compensated (Kahan): a plain FP32 sum over a 32k vocabulary loses
// ~sqrt(V) ulps, 5x the error of PyTorch's own logsumexp; with compensation only each 16-entry block's own sum
// rounds. True values: s - cs, a - ca.
struct RunningSums {
  float* m;    // running max (starts at -FLT_MAX)
  float* s;    // sum exp(z - m)
  float* cs;   // its compensation
  float* a;    // sum exp(z - m) (z - m)
  float* ca;   // its compensation
};


// Forward: fold vocabulary rows [j0, j0 + nb) of the tile, lanes [c, c + n), into the running sums of those
// positions. A new max m' rescales them by alpha = exp(m - m'): s' = alpha s, a' = alpha (a + (m - m') s), and
// their compensations alike (exact when the max did not move: alpha = 1, m - m' = 0).
// m starts at -FLT_MAX (not -inf), so m - m' never is -inf - -inf; a row that only saw -inf keeps s = a = 0.
inline void fold_block(const Tile& t, int64_t j0, int64_t nb, int64_t c, int64_t n, const RunningSums& r) {
  const Vec m = load(r.m + c, n);
  Vec s = load(r.s + c, n), cs = load(r.cs + c, n), a = load(r.a + c, n), ca = load(r.ca + c, n);
  Vec x[kBlock];
  Vec block_max(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < nb; ++j) {
    x[j] = logit(t, j0 + j, c, n);
    block_max = at::vec::maximum(block_max, x[j]);
  }
  const Vec m_new = at::vec::maximum(at::vec::maximum(m, block_max), Vec(std::numeric_limits<float>::lowest()));
  const Vec dm = clamp_exp_arg(m - m_new);
  const Vec alpha = dm.exp();
  a = alpha * (a + dm * s);
  ca = alpha * (ca + dm * cs);
  s = alpha * s;
  cs = alpha * cs;
  Vec block_s(0.0f), block_a(0.0f);
  for (int64_t j = 0; j < nb; ++j) {
    const Vec d = clamp_exp_arg(x[j] - m_new);
    const Vec e = d.exp();
    block_s = block_s + e;
    block_a = at::vec::fmadd(e, d, block_a);
  }
  kahan_add(s, cs, block_s);
  kahan_add(a, ca, block_a);
  store(m_new, r.m + c, n);
  store(s, r.s + c, n);
  store(cs, r.cs + c, n);
  store(a, r.a + c, n);
  store(ca, r.ca + c, n);
}

// Forward epilogue over positions [c0, c1) of the tile: blocks of kBlock vocabulary rows (outer) sweep the range's
// lane groups (inner), so every load streams along a row of zT instead of striding across rows (one page each).
void fold_range(const Tile& t, int64_t c0, int64_t c1, const RunningSums& r) {
  for (int64_t j0 = 0; j0 < t.vt; j0 += kBlock) {
    const int64_t nb = std::min(kBlock, t.vt - j0);
    for (int64_t c = c0; c < c1; c += kLanes) {
      fold_block(t, j0, nb, c, std::min(kLanes, c1 - c), r);
    }
  }
}

// Backward epilogue: overwrite positions [c0, c1) of the tile with dz^T, where per position (log p = z - lse):
//   dz = (g_lp ([v = t] - p) - g_ent p (log p + ent)) / T = p (c1 + c2 log p) + [v = t] g_lp / T,
//   c1 = -(g_lp + g_ent ent) / T,  c2 = -g_ent / T   (both 0 on ignored positions: their dz is exactly 0),
// times the cap's slope with a soft cap. The [v = t] term is added by the caller.
void dz_range(const Tile& t, int64_t c0, int64_t c1, const float* lse_p, const float* c1_p, const float* c2_p) {
  for (int64_t j = 0; j < t.vt; ++j) {
    for (int64_t c = c0; c < c1; c += kLanes) {
      const int64_t n = std::min(kLanes, c1 - c);
      Vec slope(1.0f);
      const Vec lp = clamp_exp_arg(logit(t, j, c, n, &slope) - load(lse_p + c, n));
      const Vec p = lp.exp();
      Vec dz = p * at::vec::fmadd(load(c2_p + c, n), lp, load(c1_p + c, n));
      if (t.softcap > 0.0f) {
        dz = dz * slope;
      }
      store(dz, t.z + j * t.ld + c, n);
    }
  }
}


void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& targets, int64_t tile_rows, int64_t tile_vocab) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && targets.device().is_cpu(),
              "rlcore cpp backend: hidden, weight and targets must be CPU tensors");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "rlcore cpp backend: hidden must be [N, H] and weight [V, H], got ", hidden.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), "rlcore cpp backend: targets must be [N]");
  TORCH_CHECK(!c10::isFloatingType(targets.scalar_type()) && targets.scalar_type() != at::kBool,
              "rlcore cpp backend: targets must be an integer tensor");
  for (const at::Tensor* x : {&hidden, &weight}) {
    const auto dt = x->scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                "rlcore cpp backend: hidden and weight must be float32, bfloat16 or float16, got ", dt);
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->device().is_cpu(),
                "rlcore cpp backend: bias must be a CPU [V] tensor");
  }
  TORCH_CHECK(tile_rows > 0 && tile_vocab > 0, "rlcore cpp backend: tile sizes must be positive");
}

// ---------------------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------------------

// Returns (lse, raw entropy, target logit), each FP32 [N], as rlcore.chunked.linear_logprobs_fwd does. A target id
// outside [0, V) matches no tile: its logit stays 0 (the caller masks ignored positions).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double inv_temp, int64_t tile_rows, int64_t tile_vocab, bool onednn, double softcap) {
  check_inputs(hidden, weight, bias, targets, tile_rows, tile_vocab);
  const int64_t N = hidden.size(0), V = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const at::Tensor h = hidden.to(at::kFloat).contiguous();
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor tgt = targets.to(at::kLong).contiguous();
  // Running sums, one row each: max, sum exp, its compensation, sum exp * (z - max), its compensation.
  at::Tensor sums = at::zeros({5, N}, f32);
  sums[0].fill_(std::numeric_limits<float>::lowest());
  at::Tensor zt = at::zeros({N}, f32);
  float* base = sums.data_ptr<float>();
  float* zt_p = zt.data_ptr<float>();
  const int64_t* t_p = tgt.data_ptr<int64_t>();
  const float* b_p = b.defined() ? b.data_ptr<float>() : nullptr;

  for (int64_t v0 = 0; v0 < V; v0 += tile_vocab) {
    const int64_t vt = std::min(tile_vocab, V - v0);
    const at::Tensor w = weight_tile(weight, v0, vt);
    for (int64_t r0 = 0; r0 < N; r0 += tile_rows) {
      const int64_t rows = std::min(tile_rows, N - r0);
      at::Tensor zT = mm_nt(w, h.narrow(0, r0, rows), onednn);   // [vt, rows]
      TORCH_INTERNAL_ASSERT(zT.is_contiguous() && zT.scalar_type() == at::kFloat);
      const Tile tile{zT.data_ptr<float>(), rows, vt, rows, v0, b_p, static_cast<float>(inv_temp),
                      static_cast<float>(softcap)};
      parallel_over_positions(rows, [&](int64_t c0, int64_t c1) {
        fold_range(tile, c0, c1, RunningSums{base + r0, base + N + r0, base + 2 * N + r0, base + 3 * N + r0,
                                             base + 4 * N + r0});
        for (int64_t i = c0; i < c1; ++i) {
          const int64_t j = t_p[r0 + i] - v0;
          if (j >= 0 && j < vt) {
            zt_p[r0 + i] = logit_scalar(tile, j, i);
          }
        }
      });
    }
  }
  // lse = m + log s; entropy = -sum p (z - lse) = log s - a / s.
  const at::Tensor s = sums[1] - sums[2], a = sums[3] - sums[4];
  const at::Tensor log_s = s.log();
  return {sums[0] + log_s, log_s - a / s, zt};
}

// ---------------------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------------------

// Returns (dh [N, H] in hidden's dtype, dW [V, H] in weight's dtype, db [V] in bias's dtype); a gradient not asked
// for is an undefined tensor. grad_entropy may be absent (no gradient reached the entropy output).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_bwd(
    const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy, const at::Tensor& hidden,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& targets,
    const at::Tensor& lse, const at::Tensor& entropy, double inv_temp, int64_t ignore_index, bool compute_dh,
    bool compute_dw, bool compute_db, int64_t tile_rows, int64_t tile_vocab, bool onednn, double softcap) {
  check_inputs(hidden, weight, bias, targets, tile_rows, tile_vocab);
  const int64_t N_all = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  compute_db = compute_db && bias.has_value();
  const auto f32 = hidden.options().dtype(at::kFloat);
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor tgt_all = targets.to(at::kLong).contiguous();

  // Per-position coefficients of dz (see dz_range), with ignored positions zeroed.
  const at::Tensor valid = tgt_all.ne(ignore_index);
  at::Tensor g_lp = at::where(valid, grad_logp.to(at::kFloat), 0.0f);
  at::Tensor g_ent = grad_entropy.has_value() ? at::where(valid, grad_entropy->to(at::kFloat), 0.0f)
                                              : at::zeros({N_all}, f32);
  // Only the rows that carry gradient enter the GEMMs: the others contribute exactly nothing to dW, db and dh (their
  // dh is 0), even when their hidden state holds NaN or inf, and cost nothing. (A zero dz row would not do: 0 * NaN.)
  const at::Tensor live = g_lp.ne(0.0f).logical_or(g_ent.ne(0.0f));
  const int64_t n_live = live.sum().item<int64_t>();
  const bool compact = n_live < N_all;
  const at::Tensor rows = compact ? live.nonzero().squeeze(1) : at::Tensor();
  auto pick = [&](const at::Tensor& x) { return compact ? x.index_select(0, rows) : x; };
  const int64_t N = n_live;
  const at::Tensor h = pick(hidden).to(at::kFloat).contiguous();
  const at::Tensor tgt = pick(tgt_all).contiguous();
  g_lp = pick(g_lp);
  g_ent = pick(g_ent);
  const at::Tensor ent = pick(entropy).to(at::kFloat).contiguous();
  const at::Tensor c1 = ((g_lp + g_ent * ent) * -inv_temp).contiguous();
  const at::Tensor c2 = (g_ent * -inv_temp).contiguous();
  const at::Tensor g_target = (g_lp * inv_temp).contiguous();
  const at::Tensor lse32 = pick(lse).to(at::kFloat).contiguous();
  const float *c1_p = c1.data_ptr<float>(), *c2_p = c2.data_ptr<float>(), *gt_p = g_target.data_ptr<float>();
  const float* lse_p = lse32.data_ptr<float>();
  const int64_t* t_p = tgt.data_ptr<int64_t>();
  const float* b_p = b.defined() ? b.data_ptr<float>() : nullptr;

  at::Tensor dh = compute_dh ? at::zeros({N, H}, f32) : at::Tensor();
  at::Tensor dw = compute_dw ? at::empty({V, H}, weight.options().memory_format(at::MemoryFormat::Contiguous))
                             : at::Tensor();
  at::Tensor db = compute_db ? at::empty({V}, f32) : at::Tensor();

  for (int64_t v0 = 0; v0 < V; v0 += tile_vocab) {
    const int64_t vt = std::min(tile_vocab, V - v0);
    const at::Tensor w = weight_tile(weight, v0, vt);
    // dW of the tile: accumulated in place when dW is FP32, else in an FP32 tile written once below.
    at::Tensor dw_acc;
    if (compute_dw) {
      dw_acc = dw.scalar_type() == at::kFloat ? dw.narrow(0, v0, vt) : at::empty({vt, H}, f32);
      dw_acc.zero_();
    }
    at::Tensor db_acc = compute_db ? db.narrow(0, v0, vt).zero_() : at::Tensor();
    for (int64_t r0 = 0; r0 < N; r0 += tile_rows) {
      const int64_t rows = std::min(tile_rows, N - r0);
      const at::Tensor h_r = h.narrow(0, r0, rows);
      at::Tensor dzT = mm_nt(w, h_r, onednn);                        // logits^T [vt, rows], then dz^T in place
      TORCH_INTERNAL_ASSERT(dzT.is_contiguous() && dzT.scalar_type() == at::kFloat);
      const Tile tile{dzT.data_ptr<float>(), rows, vt, rows, v0, b_p, static_cast<float>(inv_temp),
                      static_cast<float>(softcap)};
      parallel_over_positions(rows, [&](int64_t c0, int64_t c1) {
        // the cap's slope at each target (read before dz_range overwrites the logits), 1 without a cap
        std::vector<float> target_slope(tile.softcap > 0.0f ? c1 - c0 : 0, 1.0f);
        for (int64_t i = c0; i < c1 && tile.softcap > 0.0f; ++i) {
          const int64_t j = t_p[r0 + i] - v0;
          if (j >= 0 && j < vt) {
            target_slope[i - c0] = slope_scalar(tile, j, i);
          }
        }
        dz_range(tile, c0, c1, lse_p + r0, c1_p + r0, c2_p + r0);
        for (int64_t i = c0; i < c1; ++i) {
          const int64_t j = t_p[r0 + i] - v0;
          if (j >= 0 && j < vt) {
            tile.z[j * tile.ld + i] += tile.softcap > 0.0f ? gt_p[r0 + i] * target_slope[i - c0] : gt_p[r0 + i];
          }
        }
      });
      if (compute_dw) {
        mm_nt_acc(dw_acc, dzT, h_r.t(), onednn);                    // += dz^T h_r     [vt, H]
      }
      if (compute_dh) {
        at::Tensor dh_r = dh.narrow(0, r0, rows);
        mm_nt_acc(dh_r, dzT.t(), w.t(), onednn);                    // += dz W_t       [rows, H]
      }
      if (compute_db) {
        db_acc.add_(dzT.sum(1));
      }
    }
    if (compute_dw && dw.scalar_type() != at::kFloat) {
      dw.narrow(0, v0, vt).copy_(dw_acc);
    }
  }
  if (compute_dh && compact) {
    at::Tensor full = at::zeros({N_all, H}, f32);
    full.index_copy_(0, rows, dh);
    dh = full;
  }
  return {compute_dh ? dh.to(hidden.scalar_type()) : dh, dw,
          compute_db ? db.to(bias->scalar_type()) : db};
}

}  // namespace

void rlcore_register_divergence(pybind11::module_& m);   // divergence_cpu.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlcore's compiled CPU backend of linear_logprobs and linear_divergence (ATen + OpenMP, oneDNN GEMMs "
            "when available)";
  m.def("linear_logprobs_fwd", &linear_logprobs_fwd, "(lse, raw entropy, target logit) in FP32",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("targets"), py::arg("inv_temp"),
        py::arg("tile_rows"), py::arg("tile_vocab"), py::arg("onednn"), py::arg("softcap") = 0.0,
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_logprobs_bwd", &linear_logprobs_bwd, "(dh, dW, db) in the inputs' dtypes",
        py::arg("grad_logp"), py::arg("grad_entropy"), py::arg("hidden"), py::arg("weight"), py::arg("bias"),
        py::arg("targets"), py::arg("lse"), py::arg("entropy"), py::arg("inv_temp"), py::arg("ignore_index"),
        py::arg("compute_dh"), py::arg("compute_dw"), py::arg("compute_db"), py::arg("tile_rows"),
        py::arg("tile_vocab"), py::arg("onednn"), py::arg("softcap") = 0.0, py::call_guard<py::gil_scoped_release>());
  m.def("onednn_available", &onednn_available, "whether torch's oneDNN linear op is registered for CPU");
  m.attr("vector_isa") = RLCORE_VEC_ISA;
  rlcore_register_divergence(m);
}
