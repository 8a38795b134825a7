"""``rlcore.fused_policy_loss`` against the unfused composition and the float64 materialised ground truth.

Three computations of the same loss must agree, values and the gradients of ``hidden``, ``weight`` and ``bias``:
- the ground truth: float64 materialised logits (``rlcore.reference``) -> ``rlcore.policy_loss``;
- ``fused_policy_loss(strategy="two_pass")``: ``linear_logprobs`` -> ``policy_loss``, on both backends (the Triton
  kernels run in Triton's CPU interpreter without a GPU);
- ``fused_policy_loss(strategy="single_pass")``: one pass over slices of whole sequences, with batch-wide
  denominators; small ``chunk_budget`` values force many slices.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rlcore
from rlcore.reference import linear_logprobs_reference

from .helpers import DEVICE

LOSS_KWARGS = {
    "ppo": dict(dual_clip=3.0),
    "dapo": dict(beta=0.05, kl_estimator="k3+"),
    "dr_grpo": dict(agg_constant=9.0),
    "gspo": dict(beta=0.1),
    "gspo_token": dict(is_mode="sequence_truncate", entropy_coef=0.01),
    "cispo": dict(is_mode="token_mask", entropy_coef=-0.02),
    "reinforce": dict(agg="seq-mean-token-sum", entropy_coef=0.01),
    "apo": dict(beta2=0.05),
    "oapl": dict(group_size=2, beta1=0.7, beta2=0.1),
    "kimi": dict(group_size=2, entropy_coef=0.01),
    "rebel": dict(eta=0.5),
    "sapo": dict(ratio_level="sequence", entropy_coef=0.01),
    "vespo": dict(is_mode="token_truncate"),
    "luspo": dict(beta=0.05, off_policy_mask=0.0),
    "gmpo": dict(is_mode="sequence_mask"),
    "dro": dict(dro_beta=0.3),
    "dppo_tv": dict(eps_low=0.05, eps_high=0.05),
    "dppo_kl": dict(eps_low=0.02, eps_high=0.02, beta=0.1, kl_is_weighted=True),
    "clip_cov": dict(cov_ratio=0.2, clip_cov_lb=-1.0, clip_cov_ub=1.0),
    "kl_cov": dict(cov_ratio=0.1, kl_cov_coef=0.5, top_entropy_quantile=0.5),
}
# losses whose terms read batch-wide functions of the log-probs: no single pass (auto runs two passes)
WHOLE_BATCH = ("clip_cov", "kl_cov")
# the RL losses; the distillation family (a teacher head) is tested in tests/test_opd_losses.py
RL_LOSSES = tuple(k for k in rlcore.LOSS_TYPES if rlcore.LOSSES[k].family != "distill")


def make_batch(B, T, H, V, *, dtype=torch.float64, packed=False, bias=True, seed=0, ignore=True):
    """A batch whose logits are O(1): prompt tokens masked, some targets ignored, per-sequence advantages and
    rewards, and old / ref / sampler log-probs near the float64 truth (so ratios sit near and across the clip)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5
    b = 0.2 * torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    lengths = torch.randint(0, T + 1, (B,), generator=g)               # loss tokens per sequence, 0 allowed
    for i in range(B):
        mask[i, : T - int(lengths[i])] = False                         # the prompt
    if ignore and T > 1:
        targets[:, -1] = -100                                          # padding past the end
    with torch.no_grad():
        lp = linear_logprobs_reference(hidden, weight, targets.clamp(min=0), bias=b)
    noise = lambda s: s * torch.randn(B, T, generator=g, dtype=torch.float64)  # noqa: E731
    batch = dict(
        hidden=hidden, weight=weight, bias=b, targets=targets, mask=mask,
        advantages=torch.randn(B, generator=g, dtype=torch.float64),
        old_logp=lp + noise(0.2), ref_logp=lp + noise(0.3), sampler_logp=lp + noise(0.2),
        rewards=torch.rand(B, generator=g, dtype=torch.float64),
        baseline=torch.rand(B, generator=g, dtype=torch.float64),
    )
    batch = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
             for k, v in batch.items()}
    if packed:
        cu = torch.arange(B + 1, dtype=torch.int32) * T
        for k in ("hidden",):
            batch[k] = batch[k].reshape(B * T, H)
        for k in ("targets", "mask", "old_logp", "ref_logp", "sampler_logp"):
            batch[k] = batch[k].reshape(B * T)
        batch["cu_seqlens"] = cu
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def loss_args(batch, loss_type):
    args = dict(LOSS_KWARGS[loss_type], loss_type=loss_type)
    if loss_type == "clip_cov":
        args["generator"] = torch.Generator().manual_seed(0)      # the same random choice in every call
    for k in ("old_logp", "ref_logp", "sampler_logp", "cu_seqlens"):
        if k in batch:
            args[k] = batch[k]
    if loss_type in ("apo", "oapl", "kimi", "rebel"):
        args["rewards"] = batch["rewards"]
        if loss_type == "apo":
            args["baseline"] = batch["baseline"]
    return args


def leaves(batch, dtype):
    h = batch["hidden"].detach().to(dtype).requires_grad_()
    w = batch["weight"].detach().to(dtype).requires_grad_()
    b = None if batch["bias"] is None else batch["bias"].detach().to(dtype).requires_grad_()
    return h, w, b


def grads_of(loss, tensors):
    tensors = [t for t in tensors if t is not None]
    return [g.double() for g in torch.autograd.grad(loss, tensors)]


def ground_truth(batch, loss_type, temperature=1.0):
    """float64 materialised logits -> policy_loss: value and gradients of hidden, weight, bias."""
    h, w, b = leaves(batch, torch.float64)
    lp, ent = linear_logprobs_reference(h, w, batch["targets"], bias=b, temperature=temperature,
                                        return_entropy=True)
    mask = batch["mask"] & (batch["targets"] != -100)
    out = rlcore.policy_loss(lp, batch["advantages"].double(), mask, entropy=ent, **loss_args(batch, loss_type))
    return out, [out.loss.detach()] + grads_of(out.loss, [h, w, b])


def fused(batch, loss_type, dtype=torch.float64, **kw):
    h, w, b = leaves(batch, dtype)
    out = rlcore.fused_policy_loss(h, w, batch["targets"], batch["advantages"], batch["mask"], bias=b,
                                   **loss_args(batch, loss_type), **kw)
    return out, [out.loss.detach().double()] + grads_of(out.loss, [h, w, b])


def assert_close(got, want, rtol, what):
    names = ["loss", "d hidden", "d weight", "d bias"]
    for name, x, y in zip(names, got, want):
        scale = y.abs().max().clamp(min=1e-12)
        err = ((x - y).abs().max() / scale).item()
        assert err <= rtol, f"{what}: {name} relative error {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("strategy", ["two_pass", "single_pass"])
@pytest.mark.parametrize("loss_type", RL_LOSSES)
def test_fused_matches_float64_composition(loss_type, strategy, layout):
    """Every loss, both strategies and layouts, float64 on the PyTorch backend: equal to the ground truth to
    rounding. ``chunk_budget`` of 2 sequences' worth of logits forces several single-pass slices."""
    B, T, H, V = 6, 7, 12, 37
    batch = make_batch(B, T, H, V, packed=layout == "packed", seed=3)
    if strategy == "single_pass" and loss_type in WHOLE_BATCH:
        with pytest.raises(ValueError, match="single_pass"):
            fused(batch, loss_type, strategy=strategy, backend="torch")
        strategy = "auto"                                             # which must then run two passes
    truth, want = ground_truth(batch, loss_type)
    out, got = fused(batch, loss_type, strategy=strategy, backend="torch", chunk_budget=2 * T * V,
                     compute_entropy=True)
    assert_close(got, want, 1e-10, f"{loss_type} {strategy} {layout}")
    for k, v in truth.metrics.items():
        assert k in out.metrics, k
        torch.testing.assert_close(out.metrics[k].double(), v.double(), rtol=1e-9, atol=1e-12, msg=k)


@pytest.mark.parametrize("loss_type", ["gspo", "cispo", "apo", "rebel"])
def test_fused_triton_two_pass_matches(loss_type):
    """The Triton kernels (interpreter on CPU) under the fused loss: FP32 inputs against the float64 truth."""
    B, T, H, V = 4, 5, 16, 70
    batch = make_batch(B, T, H, V, dtype=torch.float32, seed=5)
    _, want = ground_truth(batch, loss_type)
    _, got = fused(batch, loss_type, dtype=torch.float32, strategy="two_pass", backend="triton")
    assert_close(got, want, 2e-5, f"{loss_type} triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_fp32_and_bf16_single_pass_match_two_pass(dtype):
    """In FP32 (and for bf16 inputs, whose head math is FP32 on this backend) the strategies agree to FP32
    rounding: the single pass changes the summation order only."""
    B, T, H, V = 4, 9, 24, 101
    batch = make_batch(B, T, H, V, dtype=dtype, seed=7)
    _, one = fused(batch, "gspo_token", dtype=dtype, strategy="single_pass", backend="torch", chunk_budget=T * V)
    _, two = fused(batch, "gspo_token", dtype=dtype, strategy="two_pass", backend="torch")
    assert_close(one, two, 1e-5, str(dtype))


@given(
    B=st.integers(1, 5),
    T=st.integers(1, 9),
    H=st.sampled_from([1, 8, 19]),
    V=st.integers(1, 40),
    loss_type=st.sampled_from(RL_LOSSES),
    packed=st.booleans(),
    temperature=st.sampled_from([1.0, 0.6]),
    budget_seqs=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_fused_property(B, T, H, V, loss_type, packed, temperature, budget_seqs, seed):
    """Random shapes (V = 1, H = 1, one token, empty sequences) and slice budgets: both strategies equal the truth."""
    if loss_type == "rebel":
        B = 2 * ((B + 1) // 2)
    batch = make_batch(B, T, H, V, packed=packed, seed=seed)
    _, want = ground_truth(batch, loss_type, temperature=temperature)
    for strategy in ("two_pass", "auto" if loss_type in WHOLE_BATCH else "single_pass"):
        _, got = fused(batch, loss_type, strategy=strategy, backend="torch", temperature=temperature,
                       chunk_budget=budget_seqs * T * V)
        assert_close(got, want, 1e-9, f"{loss_type} {strategy}")


def test_all_masked_gives_zero():
    batch = make_batch(3, 4, 8, 20, seed=1)
    batch["mask"][:] = False
    for strategy in ("two_pass", "single_pass"):
        out, got = fused(batch, "gspo", strategy=strategy, backend="torch")
        assert out.loss.item() == 0.0
        assert all(torch.all(g == 0) for g in got[1:]), strategy


def test_auto_picks_single_pass_when_sequences_fit(monkeypatch):
    """``auto`` runs the single pass on the PyTorch backend when a sequence's loss tokens x V fit the budget."""
    from rlcore import fused as fused_module

    seen = []
    real = fused_module._single_pass
    monkeypatch.setattr(fused_module, "_single_pass", lambda *a, **k: seen.append(1) or real(*a, **k))
    batch = make_batch(2, 5, 8, 20, seed=2, ignore=False)
    batch["mask"][:] = True
    fused(batch, "ppo", backend="torch", chunk_budget=5 * 20)
    assert seen == [1]
    fused(batch, "ppo", backend="torch", chunk_budget=5 * 20 - 1)   # one sequence no longer fits: two passes
    assert seen == [1]


def test_errors():
    batch = make_batch(2, 3, 4, 10, seed=0)
    h, w, _ = leaves(batch, torch.float64)
    t, adv, m = batch["targets"], batch["advantages"], batch["mask"]
    old = batch["old_logp"]
    with pytest.raises(ValueError, match="strategy"):
        rlcore.fused_policy_loss(h, w, t, adv, m, old_logp=old, strategy="three_pass")
    with pytest.raises(TypeError, match="logp"):
        rlcore.fused_policy_loss(h, w, t, adv, m, old_logp=old, logp=old)
    with pytest.raises(ValueError, match="mask"):
        rlcore.fused_policy_loss(h, w, t, adv, m[:, :2], old_logp=old)
    with pytest.raises(ValueError, match="hidden"):
        rlcore.fused_policy_loss(h.reshape(6, 4), w, t.reshape(6), adv, m.reshape(6), old_logp=old)
    with pytest.raises(ValueError, match="targets"):
        rlcore.fused_policy_loss(h, w, torch.full_like(t, 10), adv, m, old_logp=old)
    with pytest.raises(ValueError, match="old_logp"):
        rlcore.fused_policy_loss(h, w, t, adv, m, loss_type="ppo", strategy="single_pass")
    with pytest.raises(ValueError, match="reject"):
        rlcore.fused_policy_loss(h, w, t, adv, m, old_logp=old, sampler_logp=old, is_mode="token_mask",
                                 reject=True, strategy="single_pass")
    with pytest.raises(ValueError, match="loss_type"):
        rlcore.fused_policy_loss(h, w, t, adv, m, old_logp=old, loss_type="grpo++")


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_policy_loss_compiles_fullgraph(packed):
    """``policy_loss`` traces into one graph on both layouts (the packed sequence sums are ``rlcore::`` ops)."""
    batch = make_batch(3, 5, 8, 20, packed=packed, seed=4, dtype=torch.float32)
    lp = batch["old_logp"].detach().clone().requires_grad_()
    args = dict(old_logp=batch["old_logp"] + 0.05, cu_seqlens=batch.get("cu_seqlens"), check_inputs=False,
                loss_type="gspo", is_mode="sequence_truncate", sampler_logp=batch["sampler_logp"], beta=0.1,
                ref_logp=batch["ref_logp"], eps_low=0.2, eps_high=0.2)

    def f(logp, adv, mask):
        return rlcore.policy_loss(logp, adv, mask, **args).loss

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    want = f(lp, batch["advantages"], batch["mask"])
    got = compiled(lp, batch["advantages"], batch["mask"])
    torch.testing.assert_close(got, want)
    (g1,) = torch.autograd.grad(want, lp)
    (g2,) = torch.autograd.grad(got, lp)
    torch.testing.assert_close(g2, g1)
    assert g1.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs only exist on CUDA")
@pytest.mark.parametrize("loss_type", ["gspo", "apo", "cispo"])
def test_packed_policy_loss_does_not_sync(loss_type):
    """On CUDA the packed loss (forward and backward) runs with no host sync once ``check_inputs=False``."""
    batch = make_batch(4, 6, 8, 20, packed=True, seed=6, dtype=torch.float32)
    lp = batch["old_logp"].detach().clone().requires_grad_()
    kw = loss_args(batch, loss_type)
    kw.pop("rewards", None)
    if loss_type == "apo":
        kw.update(rewards=batch["rewards"], baseline=batch["baseline"])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = rlcore.policy_loss(lp, batch["advantages"], batch["mask"], check_inputs=False, **kw)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(lp.grad).all()
