// The compiled CPU backend of rlcore::linear_divergence (forward) and rlcore::linear_divergence_backward.
//
// Same math and the same per-row statistics as the chunked path in rlcore/divergence.py (its module doc states them):
// stats [4, N] = (lse_S, lse_T, c1, c2), c1 = D and c2 = mu for the KLs, c1 = KL(p || m) and c2 = KL(q || m) for the
// JSD. The student's and the teacher's logits, z = (h W^T + b) / T, never exist as [N, V] tensors.
//
// Layout of the work, as in linear_logprobs_cpu.cpp (cpu_tiles.h holds the shared pieces): the vocabulary in tiles of
// Vt entries (outer loop), the rows in tiles of R (inner loop). Each step is two GEMMs, one per head, writing the
// transposed FP32 logit tiles zT [Vt, R] = W_t h_r^T, and an epilogue that reads both tiles while they are in cache,
// the positions as vector lanes:
//   forward   a KL(A || B) fold: per position the running max and sum exp of both heads and the sum of
//             exp(z_A - m_A) ((z_A - m_A) - (z_B - m_B)), rescaled when a max moves. That gives both log-sum-exps,
//             the KL and mu in one pass. reverse_kl is (A, B) = (student, teacher), forward_kl the swap. The JSD runs
//             the same fold for the normalisers, then a second pass summing p (ls - lm) and q (lt - lm).
//   backward  recomputes both tiles, overwrites them with dz^T in place, and feeds each head's to two GEMMs:
//             dW_t += dz^T h_r (an FP32 [Vt, H] tile per vocabulary tile) and dh_r += dz W_t (FP32 [N, H]).
//   fused     (divergence_fused, for a loss sum_i w_i D_i whose weights the forward knows: linear_divergence's
//             reduction) rows outer, each block of rows' tiles spanning the whole vocabulary: the forward's folds
//             over them, then dz in place and the two gradient GEMMs, so each logit is formed once (4 GEMMs, not 6).
// The gap (z_A - m_A) - (z_B - m_B) is a difference of small numbers for the entries that carry the mass, so logits of
// 1e4 leave no rounding of size ulp(1e4) in the KL, and the mu form of the gradient has no lse_A - lse_B in it.
//
// Masked rows (valid false in the forward; no gradient in the backward) are dropped before the GEMMs, so they cost
// nothing, give stats 0 and zero gradients even when their hidden states hold NaN. Sums are Kahan-compensated per
// block of kDivBlock vocabulary entries. The tile order is fixed and every output element has one owner: results are
// bitwise reproducible for a thread count.

#include "cpu_tiles.h"

namespace {

// Vocabulary entries per register block: two heads' logits (2 x 8 vectors) between the block's max and its exps.
constexpr int64_t kDivBlock = 8;
constexpr int64_t kReverseKL = 0, kForwardKL = 1, kJSD = 2;
// Vocabulary rows per dW GEMM (HeadGrads::add): bounds its product's temporary to kDwSlice x H.
constexpr int64_t kDwSlice = 4096;

inline Vec masked_product(const Vec& p, const Vec& x) {   // p x where p > 0, else 0 (never 0 * inf)
  return Vec::blendv(Vec(0.0f), p * x, p > Vec(0.0f));
}

// log(exp(x) + exp(y)), finite when either is.
inline Vec log_add_exp(const Vec& x, const Vec& y) {
  const Vec hi = at::vec::maximum(x, y);
  return hi + (Vec(0.0f) - (x - y).abs()).exp().log1p();
}

// ---------------------------------------------------------------------------------------------------------------------
// Forward folds
// ---------------------------------------------------------------------------------------------------------------------

// Running per-position sums of the KL(A || B) fold, each with its compensation (true value: x - cx): the max and sum
// exp of A (ma, sa), of B (mb, sb), g = sum exp(z_A - m_A) ((z_A - m_A) - (z_B - m_B)) (the KL's, free of the
// rounding of m_A - m_B) and u = sum exp(z_A - m_A) (z_A - z_B) (mu's: the gaps rounded as the backward rounds them,
// so a near one-hot position whose argmax the heads share gets a gradient of exactly 0, as on the chunked path).
struct KlSums {
  float *ma, *sa, *csa, *mb, *sb, *csb, *g, *cg, *u, *cu;
  KlSums at(int64_t off) const { return {ma + off, sa + off, csa + off, mb + off, sb + off, csb + off, g + off,
                                          cg + off, u + off, cu + off}; }
};

// Fold vocabulary rows [j0, j0 + nb) of both tiles, lanes [c, c + n). New maxima rescale the sums: s' = alpha s,
// u' = alpha_A u and g' = alpha_A (g + (dm_A - dm_B) s_A), dm = m - m' <= 0 (m starts at -FLT_MAX: dm is finite).
inline void kl_fold_block(const Tile& a, const Tile& b, int64_t j0, int64_t nb, int64_t c, int64_t n,
                          const KlSums& r) {
  Vec xa[kDivBlock], xb[kDivBlock];
  Vec max_a(-std::numeric_limits<float>::infinity()), max_b = max_a;
  for (int64_t j = 0; j < nb; ++j) {
    xa[j] = logit(a, j0 + j, c, n);
    xb[j] = logit(b, j0 + j, c, n);
    max_a = at::vec::maximum(max_a, xa[j]);
    max_b = at::vec::maximum(max_b, xb[j]);
  }
  const Vec lowest(std::numeric_limits<float>::lowest());
  const Vec ma = load(r.ma + c, n), mb = load(r.mb + c, n);
  const Vec ma_new = at::vec::maximum(at::vec::maximum(ma, max_a), lowest);
  const Vec mb_new = at::vec::maximum(at::vec::maximum(mb, max_b), lowest);
  const Vec dma = ma - ma_new, dmb = mb - mb_new;
  const Vec alpha_a = clamp_exp_arg(dma).exp(), alpha_b = clamp_exp_arg(dmb).exp();
  Vec sa = load(r.sa + c, n), csa = load(r.csa + c, n), sb = load(r.sb + c, n), csb = load(r.csb + c, n);
  Vec g = load(r.g + c, n), cg = load(r.cg + c, n), u = load(r.u + c, n), cu = load(r.cu + c, n);
  const Vec shift = dma - dmb;
  u = alpha_a * u;
  cu = alpha_a * cu;
  g = alpha_a * (g + shift * sa);
  cg = alpha_a * (cg + shift * csa);
  sa = alpha_a * sa;
  csa = alpha_a * csa;
  sb = alpha_b * sb;
  csb = alpha_b * csb;
  Vec block_sa(0.0f), block_sb(0.0f), block_g(0.0f), block_u(0.0f);
  for (int64_t j = 0; j < nb; ++j) {
    const Vec da = xa[j] - ma_new, db = xb[j] - mb_new;
    const Vec ea = da.exp();
    block_sa = block_sa + ea;
    block_sb = block_sb + db.exp();
    block_g = block_g + masked_product(ea, da - db);
    block_u = block_u + masked_product(ea, xa[j] - xb[j]);
  }
  kahan_add(sa, csa, block_sa);
  kahan_add(sb, csb, block_sb);
  kahan_add(g, cg, block_g);
  kahan_add(u, cu, block_u);
  store(ma_new, r.ma + c, n);
  store(mb_new, r.mb + c, n);
  store(sa, r.sa + c, n);
  store(csa, r.csa + c, n);
  store(sb, r.sb + c, n);
  store(csb, r.csb + c, n);
  store(g, r.g + c, n);
  store(cg, r.cg + c, n);
  store(u, r.u + c, n);
  store(cu, r.cu + c, n);
}

// The JSD's second pass, with both log-sum-exps known: c1 += sum p (ls - lm), c2 += sum q (lt - lm), compensated.
struct JsdSums {
  const float *lse_s, *lse_t;
  float *c1, *cc1, *c2, *cc2;
  JsdSums at(int64_t off) const { return {lse_s + off, lse_t + off, c1 + off, cc1 + off, c2 + off, cc2 + off}; }
};

struct Mixture {
  float log_beta, log_1m_beta;
  static Mixture of(double beta) {
    return {static_cast<float>(std::log(beta)), static_cast<float>(std::log1p(-beta))};
  }
  Vec log_m(const Vec& ls, const Vec& lt) const { return log_add_exp(ls + Vec(log_beta), lt + Vec(log_1m_beta)); }
};

inline void jsd_fold_block(const Tile& s, const Tile& t, int64_t j0, int64_t nb, int64_t c, int64_t n,
                           const JsdSums& r, const Mixture& mix) {
  const Vec lse_s = load(r.lse_s + c, n), lse_t = load(r.lse_t + c, n);
  Vec b1(0.0f), b2(0.0f);
  for (int64_t j = 0; j < nb; ++j) {
    const Vec ls = logit(s, j0 + j, c, n) - lse_s, lt = logit(t, j0 + j, c, n) - lse_t;
    const Vec lm = mix.log_m(ls, lt);
    b1 = b1 + masked_product(ls.exp(), ls - lm);
    b2 = b2 + masked_product(lt.exp(), lt - lm);
  }
  Vec c1 = load(r.c1 + c, n), cc1 = load(r.cc1 + c, n), c2 = load(r.c2 + c, n), cc2 = load(r.cc2 + c, n);
  kahan_add(c1, cc1, b1);
  kahan_add(c2, cc2, b2);
  store(c1, r.c1 + c, n);
  store(cc1, r.cc1 + c, n);
  store(c2, r.c2 + c, n);
  store(cc2, r.cc2 + c, n);
}

// Blocks of vocabulary rows (outer) sweep the range's lane groups (inner): loads stream along rows of zT.
template <typename F>
void fold_range(int64_t vt, int64_t c0, int64_t c1, const F& block) {
  for (int64_t j0 = 0; j0 < vt; j0 += kDivBlock) {
    const int64_t nb = std::min(kDivBlock, vt - j0);
    for (int64_t c = c0; c < c1; c += kLanes) {
      block(j0, nb, c, std::min(kLanes, c1 - c));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// Rows, heads and their gradients
// ---------------------------------------------------------------------------------------------------------------------

// The rows that enter the GEMMs (`live`), gathered when some are not.
struct Rows {
  int64_t all, n;
  at::Tensor idx;   // undefined when every row is live
  explicit Rows(const at::Tensor& live) : all(live.size(0)) {
    n = live.sum().item<int64_t>();
    if (n < all) {
      idx = live.nonzero().squeeze(1);
    }
  }
  at::Tensor pick(const at::Tensor& x) const { return idx.defined() ? x.index_select(0, idx) : x; }
  // [..., n] (along `dim`) back to [..., all], zeros on the rows that were dropped.
  at::Tensor scatter(const at::Tensor& x, int64_t dim) const {
    if (!idx.defined()) {
      return x;
    }
    auto sizes = x.sizes().vec();
    sizes[dim] = all;
    return at::zeros(sizes, x.options()).index_copy_(dim, idx, x);
  }
};

// One head on the live rows: FP32 hidden states [n, H], the weight [V, H] (any float dtype), FP32 bias or undefined.
struct Head {
  at::Tensor h, w, b;
  Head(const Rows& rows, const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias)
      : h(rows.pick(hidden).to(at::kFloat).contiguous()), w(weight),
        b(bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor()) {}
  const float* bias_ptr() const { return b.defined() ? b.data_ptr<float>() : nullptr; }
};

// The logit tile zT [vt, rows] of a head (FP32, contiguous) and its epilogue view.
struct HeadTile {
  at::Tensor z;
  Tile t;
  HeadTile(const Head& head, const at::Tensor& w_tile, int64_t v0, int64_t r0, int64_t rows, float inv_temp,
           bool onednn)
      : z(mm_nt(w_tile, head.h.narrow(0, r0, rows), onednn)) {
    TORCH_INTERNAL_ASSERT(z.is_contiguous() && z.scalar_type() == at::kFloat);
    t = Tile{z.data_ptr<float>(), rows, w_tile.size(0), rows, v0, head.bias_ptr(), inv_temp, 0.0f};
  }
};

// dh, dW, db of one head, accumulated a tile at a time as in linear_logprobs_bwd.
struct HeadGrads {
  bool need_dh, need_dw, need_db;
  at::TensorOptions f32;
  at::Tensor dh, dw, db, dw_acc, db_acc;
  // fp32_out: dW in FP32 whatever the weight's dtype (else in the weight's).
  HeadGrads(const Head& head, int64_t n, bool dh_, bool dw_, bool db_, bool fp32_out)
      : need_dh(dh_), need_dw(dw_), need_db(db_ && head.b.defined()), f32(head.h.options().dtype(at::kFloat)) {
    const int64_t V = head.w.size(0), H = head.w.size(1);
    if (need_dh) dh = at::zeros({n, H}, f32);
    if (need_dw) dw = at::empty({V, H}, fp32_out ? f32 : head.w.options().memory_format(at::MemoryFormat::Contiguous));
    if (need_db) db = at::empty({V}, f32);
  }
  bool any() const { return need_dh || need_dw || need_db; }
  void begin(int64_t v0, int64_t vt) {
    if (need_dw) {
      dw_acc = dw.scalar_type() == at::kFloat ? dw.narrow(0, v0, vt) : at::empty({vt, dw.size(1)}, f32);
      dw_acc.zero_();
    }
    if (need_db) db_acc = db.narrow(0, v0, vt).zero_();
  }
  // dzT [vt, rows] of this head for rows [r0, r0 + rows).
  void add(const at::Tensor& dzT, const Head& head, const at::Tensor& w_tile, int64_t r0, int64_t rows, bool onednn) {
    const at::Tensor h_r = head.h.narrow(0, r0, rows);
    if (need_dw) {                                                       // += dz^T h_r     [vt, H]
      // In slices of vocabulary rows: oneDNN's product is a temporary added to the accumulator, so a block spanning
      // the whole vocabulary (divergence_fused) would otherwise allocate a second [V, H].
      for (int64_t j = 0; j < dzT.size(0); j += kDwSlice) {
        const int64_t n = std::min(kDwSlice, dzT.size(0) - j);
        at::Tensor acc = dw_acc.narrow(0, j, n);
        mm_nt_acc(acc, dzT.narrow(0, j, n), h_r.t(), onednn);
      }
    }
    if (need_dh) {
      at::Tensor dh_r = dh.narrow(0, r0, rows);
      mm_nt_acc(dh_r, dzT.t(), w_tile.t(), onednn);                      // += dz W_t       [rows, H]
    }
    if (need_db) db_acc.add_(dzT.sum(1));
  }
  void end(int64_t v0, int64_t vt) {
    if (need_dw && dw.scalar_type() != at::kFloat) dw.narrow(0, v0, vt).copy_(dw_acc);
  }
};

void check_head(const char* name, const at::Tensor& hidden, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias, int64_t N, int64_t V) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), "rlcore cpp divergence: the ", name,
              " head must be on the CPU");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1) && hidden.size(0) == N &&
                  weight.size(0) == V,
              "rlcore cpp divergence: the ", name, " head must be hidden [N, H] and weight [V, H], got ",
              hidden.sizes(), " and ", weight.sizes());
  for (const at::Tensor* x : {&hidden, &weight}) {
    const auto dt = x->scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                "rlcore cpp divergence: hidden and weight must be float32, bfloat16 or float16, got ", dt);
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == V && bias->device().is_cpu(),
                "rlcore cpp divergence: the ", name, " bias must be a CPU [V] tensor");
  }
}

void check_inputs(const at::Tensor& hs, const at::Tensor& ws, const std::optional<at::Tensor>& bs,
                  const at::Tensor& ht, const at::Tensor& wt, const std::optional<at::Tensor>& bt,
                  const at::Tensor& valid, int64_t kind, int64_t tile_rows, int64_t tile_vocab) {
  const int64_t N = hs.size(0), V = ws.size(0);
  check_head("student", hs, ws, bs, N, V);
  check_head("teacher", ht, wt, bt, N, V);
  TORCH_CHECK(valid.dim() == 1 && valid.size(0) == N && valid.scalar_type() == at::kBool,
              "rlcore cpp divergence: valid must be a bool [N] tensor");
  TORCH_CHECK(kind >= kReverseKL && kind <= kJSD, "rlcore cpp divergence: kind must be 0, 1 or 2, got ", kind);
  TORCH_CHECK(tile_rows > 0 && tile_vocab > 0, "rlcore cpp divergence: tile sizes must be positive");
}

// Walk the vocabulary tiles (outer) and row tiles (inner) of both heads: body(v0, ws_tile, wt_tile, r0, rows).
template <typename F>
void for_each_tile(const Head& s, const Head& t, int64_t tile_rows, int64_t tile_vocab, const F& body) {
  const int64_t V = s.w.size(0), N = s.h.size(0);
  for (int64_t v0 = 0; v0 < V; v0 += tile_vocab) {
    const int64_t vt = std::min(tile_vocab, V - v0);
    const at::Tensor ws = weight_tile(s.w, v0, vt), wt = weight_tile(t.w, v0, vt);
    for (int64_t r0 = 0; r0 < N; r0 += tile_rows) {
      body(v0, vt, ws, wt, r0, std::min(tile_rows, N - r0));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------------------

// The KL fold's running sums for n positions, FP32 [10, n] (the KlSums order), and their views.
at::Tensor kl_sums(int64_t n, const at::TensorOptions& f32) {
  at::Tensor sums = at::zeros({10, n}, f32);
  sums[0].fill_(std::numeric_limits<float>::lowest());
  sums[3].fill_(std::numeric_limits<float>::lowest());
  return sums;
}

KlSums kl_view(at::Tensor& sums) {
  const int64_t n = sums.size(1);
  float* p = sums.data_ptr<float>();
  return {p, p + n, p + 2 * n, p + 3 * n, p + 4 * n, p + 5 * n, p + 6 * n, p + 7 * n, p + 8 * n, p + 9 * n};
}

// (lse_A, lse_B, KL(A || B), mu = E_A[z_A - z_B]), each FP32 [n], from the folded sums.
std::vector<at::Tensor> kl_finish(const at::Tensor& sums) {
  const at::Tensor sa = sums[1] - sums[2], log_sa = sa.log(), log_sb = (sums[4] - sums[5]).log();
  const at::Tensor gap = (sums[6] - sums[7]) / sa;                      // E_A[(z_A - m_A) - (z_B - m_B)]
  return {sums[0] + log_sa, sums[3] + log_sb, gap - log_sa + log_sb, (sums[8] - sums[9]) / sa};
}

// Fold one pair of tiles (all their vocabulary rows and positions) into the running sums r of their positions.
void kl_fold_tiles(const Tile& a, const Tile& b, const KlSums& r) {
  parallel_over_positions(a.rows, [&](int64_t c0, int64_t c1) {
    fold_range(a.vt, c0, c1, [&](int64_t j0, int64_t nb, int64_t c, int64_t m) {
      kl_fold_block(a, b, j0, nb, c, m, r);
    });
  });
}

void jsd_fold_tiles(const Tile& s, const Tile& t, const JsdSums& r, const Mixture& mix) {
  parallel_over_positions(s.rows, [&](int64_t c0, int64_t c1) {
    fold_range(s.vt, c0, c1, [&](int64_t j0, int64_t nb, int64_t c, int64_t m) {
      jsd_fold_block(s, t, j0, nb, c, m, r, mix);
    });
  });
}

// (lse_A, lse_B, KL(A || B), mu), each FP32 [n], from one pass over both heads.
std::vector<at::Tensor> kl_pass(const Head& a, const Head& b, float inv_temp, int64_t tile_rows, int64_t tile_vocab,
                                bool onednn) {
  at::Tensor sums = kl_sums(a.h.size(0), a.h.options().dtype(at::kFloat));
  const KlSums base = kl_view(sums);
  for_each_tile(a, b, tile_rows, tile_vocab, [&](int64_t v0, int64_t vt, const at::Tensor& wa, const at::Tensor& wb,
                                                 int64_t r0, int64_t rows) {
    const HeadTile za(a, wa, v0, r0, rows, inv_temp, onednn), zb(b, wb, v0, r0, rows, inv_temp, onednn);
    kl_fold_tiles(za.t, zb.t, base.at(r0));
  });
  return kl_finish(sums);
}

// The JSD's (c1, c2) sums for n positions, FP32 [4, n] (value, compensation of each), and their view.
JsdSums jsd_view(at::Tensor& sums, const at::Tensor& lse_s, const at::Tensor& lse_t) {
  const int64_t n = sums.size(1);
  float* p = sums.data_ptr<float>();
  return {lse_s.data_ptr<float>(), lse_t.data_ptr<float>(), p, p + n, p + 2 * n, p + 3 * n};
}

// (KL(p || m), KL(q || m)) of the JSD, FP32 [n], given both log-sum-exps.
std::vector<at::Tensor> jsd_pass(const Head& s, const Head& t, const at::Tensor& lse_s, const at::Tensor& lse_t,
                                 const Mixture& mix, float inv_temp, int64_t tile_rows, int64_t tile_vocab,
                                 bool onednn) {
  at::Tensor sums = at::zeros({4, s.h.size(0)}, s.h.options().dtype(at::kFloat));
  const at::Tensor ls = lse_s.contiguous(), lt = lse_t.contiguous();
  const JsdSums base = jsd_view(sums, ls, lt);
  for_each_tile(s, t, tile_rows, tile_vocab, [&](int64_t v0, int64_t vt, const at::Tensor& ws, const at::Tensor& wt,
                                                 int64_t r0, int64_t rows) {
    const HeadTile zs(s, ws, v0, r0, rows, inv_temp, onednn), zt(t, wt, v0, r0, rows, inv_temp, onednn);
    jsd_fold_tiles(zs.t, zt.t, base.at(r0), mix);
  });
  return {sums[0] - sums[1], sums[2] - sums[3]};
}

// stats [4, N] FP32 = (lse_S, lse_T, c1, c2), zeros on rows not valid.
at::Tensor divergence_fwd(const at::Tensor& hs, const at::Tensor& ws, const std::optional<at::Tensor>& bs,
                          const at::Tensor& ht, const at::Tensor& wt, const std::optional<at::Tensor>& bt,
                          const at::Tensor& valid, int64_t kind, double beta, double inv_temp, int64_t tile_rows,
                          int64_t tile_vocab, bool onednn) {
  check_inputs(hs, ws, bs, ht, wt, bt, valid, kind, tile_rows, tile_vocab);
  const Rows rows(valid);
  const Head s(rows, hs, ws, bs), t(rows, ht, wt, bt);
  const auto it = static_cast<float>(inv_temp);
  at::Tensor stats;
  if (kind == kForwardKL) {
    const auto r = kl_pass(t, s, it, tile_rows, tile_vocab, onednn);       // KL(q || p): A = teacher
    stats = at::stack({r[1], r[0], r[2], r[3]});
  } else {
    const auto r = kl_pass(s, t, it, tile_rows, tile_vocab, onednn);
    if (kind == kJSD) {
      const auto c = jsd_pass(s, t, r[0], r[1], Mixture::of(beta), it, tile_rows, tile_vocab, onednn);
      stats = at::stack({r[0], r[1], c[0], c[1]});
    } else {
      stats = at::stack(r);
    }
  }
  return rows.scatter(stats, 1);
}

// ---------------------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------------------

// Per-row coefficients of the backward epilogue, FP32 [n] each (see dz_range).
struct Coefs {
  const float *lse_a, *lse_b, *c_a, *c_b, *g_a, *g_b;
  Coefs at(int64_t off) const { return {lse_a + off, lse_b + off, c_a + off, c_b + off, g_a + off, g_b + off}; }
};

// Overwrite positions [c0, c1) of both tiles with the gradients of the raw logits (rlcore/divergence.py's module doc):
//   KL(A || B)   dz_A = g_a p_A (z_A - z_B - mu)              dz_B = g_a (p_B - p_A)      (c_a = mu)
//   JSD          dz_S = g_a p (ls - lm - c1)                   dz_T = g_b q (lt - lm - c2)
// with g_a = g / T (times beta for the JSD), g_b = g (1 - beta) / T. A tile whose gradient is not needed is left as is.
void dz_range(const Tile& a, const Tile& b, int64_t c0, int64_t c1, const Coefs& k, const Mixture* jsd, bool need_a,
              bool need_b) {
  for (int64_t j = 0; j < a.vt; ++j) {
    for (int64_t c = c0; c < c1; c += kLanes) {
      const int64_t n = std::min(kLanes, c1 - c);
      const Vec za = logit(a, j, c, n), zb = logit(b, j, c, n);
      const Vec la = za - load(k.lse_a + c, n), lb = zb - load(k.lse_b + c, n);
      const Vec pa = la.exp(), pb = lb.exp();
      Vec da, db;
      if (jsd != nullptr) {
        const Vec lm = jsd->log_m(la, lb);
        da = masked_product(pa, la - lm - load(k.c_a + c, n));
        db = masked_product(pb, lb - lm - load(k.c_b + c, n)) * load(k.g_b + c, n);
      } else {
        da = masked_product(pa, za - zb - load(k.c_a + c, n));
        db = (pb - pa) * load(k.g_a + c, n);
      }
      if (need_a) store(da * load(k.g_a + c, n), a.z + j * a.ld + c, n);
      if (need_b) store(db, b.z + j * b.ld + c, n);
    }
  }
}

// The backward's per-row coefficient columns (Coefs order: lse_a, lse_b, c_a, c_b, g_a, g_b), contiguous FP32 [n],
// from stats st [4, n] in (S, T) order and the upstream gradient g [n] (already times 1 / T).
std::vector<at::Tensor> coef_columns(const at::Tensor& st, const at::Tensor& g, int64_t kind, double beta) {
  std::vector<at::Tensor> cols;
  if (kind == kJSD) {
    cols = {st[0], st[1], st[2], st[3], g * beta, g * (1.0 - beta)};
  } else {
    const bool swap = kind == kForwardKL;
    cols = {st[swap ? 1 : 0], st[swap ? 0 : 1], st[3], st[3], g, g};
  }
  for (auto& x : cols) x = x.contiguous();
  return cols;
}

Coefs coef_view(const std::vector<at::Tensor>& cols) {
  return {cols[0].data_ptr<float>(), cols[1].data_ptr<float>(), cols[2].data_ptr<float>(),
          cols[3].data_ptr<float>(), cols[4].data_ptr<float>(), cols[5].data_ptr<float>()};
}

// Both heads on the rows that enter the GEMMs, in the fold's (A, B) roles, with their gradient accumulators.
struct Pair {
  Head s, t;
  bool swap;   // A = teacher: KL(q || p)
  HeadGrads gs, gt;
  bool fp32_out;   // gradients in FP32 (else in the inputs' dtypes)
  Pair(const Rows& rows, const at::Tensor& hs, const at::Tensor& ws, const std::optional<at::Tensor>& bs,
       const at::Tensor& ht, const at::Tensor& wt, const std::optional<at::Tensor>& bt, int64_t kind,
       const std::vector<bool>& needs, bool fp32)
      : s(rows, hs, ws, bs), t(rows, ht, wt, bt), swap(kind == kForwardKL),
        gs(s, rows.n, needs[0], needs[1], needs[2], fp32), gt(t, rows.n, needs[3], needs[4], needs[5], fp32),
        fp32_out(fp32) {}
  const Head& a() const { return swap ? t : s; }
  const Head& b() const { return swap ? s : t; }
  HeadGrads& ga() { return swap ? gt : gs; }
  HeadGrads& gb() { return swap ? gs : gt; }
  bool any() const { return gs.any() || gt.any(); }
  // Turn the tiles of rows [r0, r0 + nr) into dz^T in place and add them to the gradients.
  void add_tiles(const HeadTile& za, const HeadTile& zb, const at::Tensor& wa, const at::Tensor& wb, int64_t r0,
                 int64_t nr, const Coefs& k, const Mixture* jsd, bool onednn) {
    const bool need_a = ga().any(), need_b = gb().any();
    parallel_over_positions(nr, [&](int64_t c0, int64_t c1) { dz_range(za.t, zb.t, c0, c1, k, jsd, need_a, need_b); });
    if (need_a) ga().add(za.z, a(), wa, r0, nr, onednn);
    if (need_b) gb().add(zb.z, b(), wb, r0, nr, onednn);
  }
  void begin(int64_t v0, int64_t vt) { gs.begin(v0, vt); gt.begin(v0, vt); }
  void end(int64_t v0, int64_t vt) { gs.end(v0, vt); gt.end(v0, vt); }
  // (dh_S, dW_S, db_S, dh_T, dW_T, db_T) in the inputs' dtypes (db FP32 -> the bias's), or FP32; undefined where
  // not asked for.
  std::vector<at::Tensor> grads(const Rows& rows, const at::Tensor& hs, const std::optional<at::Tensor>& bs,
                                const at::Tensor& ht, const std::optional<at::Tensor>& bt) const {
    std::vector<at::Tensor> out;
    for (const HeadGrads* g : {&gs, &gt}) {
      const auto dh_type = fp32_out ? at::kFloat : (g == &gs ? hs : ht).scalar_type();
      const std::optional<at::Tensor>& bias = g == &gs ? bs : bt;
      out.push_back(g->need_dh ? rows.scatter(g->dh, 0).to(dh_type) : at::Tensor());
      out.push_back(g->need_dw ? g->dw : at::Tensor());
      out.push_back(g->need_db ? g->db.to(fp32_out ? at::kFloat : bias->scalar_type()) : at::Tensor());
    }
    return out;
  }
};

// (dh_S, dW_S, db_S, dh_T, dW_T, db_T) in the inputs' dtypes (db FP32 -> the bias's); undefined where not asked for.
std::vector<at::Tensor> divergence_bwd(const at::Tensor& grad, const at::Tensor& hs, const at::Tensor& ws,
                                       const std::optional<at::Tensor>& bs, const at::Tensor& ht,
                                       const at::Tensor& wt, const std::optional<at::Tensor>& bt,
                                       const at::Tensor& valid, const at::Tensor& stats, int64_t kind, double beta,
                                       double inv_temp, std::vector<bool> needs, int64_t tile_rows,
                                       int64_t tile_vocab, bool onednn) {
  check_inputs(hs, ws, bs, ht, wt, bt, valid, kind, tile_rows, tile_vocab);
  TORCH_CHECK(needs.size() == 6, "rlcore cpp divergence: needs must hold six bools");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 4 && stats.size(1) == hs.size(0),
              "rlcore cpp divergence: stats must be [4, N]");
  // Masked rows carry no gradient, even a NaN one; rows whose gradient is 0 contribute nothing either.
  const at::Tensor g_all = at::where(valid, grad.to(at::kFloat), 0.0f);
  const Rows rows(g_all.ne(0.0f));
  Pair pair(rows, hs, ws, bs, ht, wt, bt, kind, needs, false);
  const auto cols = coef_columns(rows.pick(stats.to(at::kFloat).t()).t(), rows.pick(g_all) * inv_temp, kind, beta);
  const Coefs base = coef_view(cols);
  const Mixture mix = Mixture::of(beta);
  const Mixture* jsd = kind == kJSD ? &mix : nullptr;
  const auto it = static_cast<float>(inv_temp);
  const int64_t V = ws.size(0);
  for (int64_t v0 = 0; v0 < V && pair.any(); v0 += tile_vocab) {
    const int64_t vt = std::min(tile_vocab, V - v0);
    const at::Tensor wa = weight_tile(pair.a().w, v0, vt), wb = weight_tile(pair.b().w, v0, vt);
    pair.begin(v0, vt);
    for (int64_t r0 = 0; r0 < rows.n; r0 += tile_rows) {
      const int64_t nr = std::min(tile_rows, rows.n - r0);
      const HeadTile za(pair.a(), wa, v0, r0, nr, it, onednn), zb(pair.b(), wb, v0, r0, nr, it, onednn);
      pair.add_tiles(za, zb, wa, wb, r0, nr, base.at(r0), jsd, onednn);
    }
    pair.end(v0, vt);
  }
  return pair.grads(rows, hs, bs, ht, bt);
}

// ---------------------------------------------------------------------------------------------------------------------
// Forward and backward in one pass, for a loss sum_i weights_i D_i whose weights are known in the forward
// ---------------------------------------------------------------------------------------------------------------------

// stats [4, nr] in (S, T) order of rows [r0, r0 + nr), from the tiles of both heads over the whole vocabulary.
at::Tensor chunk_stats(const Pair& pair, const HeadTile& za, const HeadTile& zb, int64_t kind, const Mixture& mix) {
  at::Tensor sums = kl_sums(za.t.rows, pair.s.h.options().dtype(at::kFloat));
  kl_fold_tiles(za.t, zb.t, kl_view(sums));
  auto r = kl_finish(sums);
  if (pair.swap) return at::stack({r[1], r[0], r[2], r[3]});
  if (kind != kJSD) return at::stack(r);
  at::Tensor jsums = at::zeros({4, za.t.rows}, sums.options());
  const at::Tensor ls = r[0].contiguous(), lt = r[1].contiguous();
  jsd_fold_tiles(za.t, zb.t, jsd_view(jsums, ls, lt), mix);
  return at::stack({r[0], r[1], jsums[0] - jsums[1], jsums[2] - jsums[3]});
}

// (stats [4, N], dh_S, dW_S, db_S, dh_T, dW_T, db_T): the forward's statistics and the FP32 gradients of
// sum_i weights_i D_i, from one pass over blocks of tile_rows rows, each holding both heads' logits over the whole
// vocabulary (2 tile_rows V FP32) while its statistics, then dz, are formed from them: four GEMMs to the separate
// forward and backward's six. Rows not valid are dropped before the GEMMs.
std::vector<at::Tensor> divergence_fused(const at::Tensor& weights, const at::Tensor& hs, const at::Tensor& ws,
                                         const std::optional<at::Tensor>& bs, const at::Tensor& ht,
                                         const at::Tensor& wt, const std::optional<at::Tensor>& bt,
                                         const at::Tensor& valid, int64_t kind, double beta, double inv_temp,
                                         std::vector<bool> needs, int64_t tile_rows, bool onednn) {
  check_inputs(hs, ws, bs, ht, wt, bt, valid, kind, tile_rows, 1);
  TORCH_CHECK(needs.size() == 6, "rlcore cpp divergence: needs must hold six bools");
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == hs.size(0), "rlcore cpp divergence: weights must be [N]");
  const Rows rows(valid);
  Pair pair(rows, hs, ws, bs, ht, wt, bt, kind, needs, true);
  const at::Tensor g = rows.pick(at::where(valid, weights.to(at::kFloat), 0.0f)) * inv_temp;
  const Mixture mix = Mixture::of(beta);
  const Mixture* jsd = kind == kJSD ? &mix : nullptr;
  const auto it = static_cast<float>(inv_temp);
  const int64_t V = ws.size(0);
  const at::Tensor wa = weight_tile(pair.a().w, 0, V), wb = weight_tile(pair.b().w, 0, V);
  at::Tensor stats = at::empty({4, rows.n}, pair.s.h.options().dtype(at::kFloat));
  pair.begin(0, V);
  for (int64_t r0 = 0; r0 < rows.n; r0 += tile_rows) {
    const int64_t nr = std::min(tile_rows, rows.n - r0);
    const HeadTile za(pair.a(), wa, 0, r0, nr, it, onednn), zb(pair.b(), wb, 0, r0, nr, it, onednn);
    const at::Tensor st = chunk_stats(pair, za, zb, kind, mix);
    stats.narrow(1, r0, nr).copy_(st);
    if (pair.any()) {
      const auto cols = coef_columns(st, g.narrow(0, r0, nr), kind, beta);
      pair.add_tiles(za, zb, wa, wb, r0, nr, coef_view(cols), jsd, onednn);
    }
  }
  pair.end(0, V);
  std::vector<at::Tensor> out{rows.scatter(stats, 1)};
  for (auto& x : pair.grads(rows, hs, bs, ht, bt)) out.push_back(x);
  return out;
}

}  // namespace

// Called from the extension's PYBIND11_MODULE (linear_logprobs_cpu.cpp): one module, one build.
void rlcore_register_divergence(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("divergence_fwd", &divergence_fwd, "stats [4, N] FP32 (lse_S, lse_T, c1, c2) of rlcore::linear_divergence",
        py::arg("hs"), py::arg("ws"), py::arg("bs"), py::arg("ht"), py::arg("wt"), py::arg("bt"), py::arg("valid"),
        py::arg("kind"), py::arg("beta"), py::arg("inv_temp"), py::arg("tile_rows"), py::arg("tile_vocab"),
        py::arg("onednn"), py::call_guard<py::gil_scoped_release>());
  m.def("divergence_bwd", &divergence_bwd, "(dh_S, dW_S, db_S, dh_T, dW_T, db_T) in the inputs' dtypes",
        py::arg("grad"), py::arg("hs"), py::arg("ws"), py::arg("bs"), py::arg("ht"), py::arg("wt"), py::arg("bt"),
        py::arg("valid"), py::arg("stats"), py::arg("kind"), py::arg("beta"), py::arg("inv_temp"), py::arg("needs"),
        py::arg("tile_rows"), py::arg("tile_vocab"), py::arg("onednn"), py::call_guard<py::gil_scoped_release>());
  m.def("divergence_fused", &divergence_fused,
        "(stats [4, N], dh_S, dW_S, db_S, dh_T, dW_T, db_T) of sum_i weights_i D_i, in one pass",
        py::arg("weights"), py::arg("hs"), py::arg("ws"), py::arg("bs"), py::arg("ht"), py::arg("wt"), py::arg("bt"),
        py::arg("valid"), py::arg("kind"), py::arg("beta"), py::arg("inv_temp"), py::arg("needs"),
        py::arg("tile_rows"), py::arg("onednn"), py::call_guard<py::gil_scoped_release>());
}
