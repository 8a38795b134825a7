"""``fused_policy_loss(backend="triton", strategy="single_pass")``: the Triton slice head (``kernels/slice_head.py``).

Run in Triton's CPU interpreter without a GPU. Checked against the float64 composition (values and the gradients of
hidden, weight and bias) on both layouts with many slices, for both backward GEMM choices; in bf16 against the Triton
two-pass strategy (the same kernels' numbers, one GEMM fewer); and ``auto`` picking it where the sequences fit.
"""

import pytest
import torch

import rlcore

from .test_fused_loss import assert_close, fused, ground_truth, make_batch

LOSSES = ["gspo", "cispo", "apo", "rebel", "ppo"]


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("loss_type", LOSSES)
def test_triton_single_pass_matches_float64(loss_type, layout):
    B, T, H, V = 4, 6, 16, 70
    batch = make_batch(B, T, H, V, dtype=torch.float32, packed=layout == "packed", seed=11)
    _, want = ground_truth(batch, loss_type, temperature=0.7)
    _, got = fused(batch, loss_type, dtype=torch.float32, strategy="single_pass", backend="triton",
                   temperature=0.7, chunk_budget=V, compute_entropy=True)   # one sequence per slice
    assert_close(got, want, 2e-5, f"{loss_type} {layout} triton single pass")


@pytest.mark.parametrize("gemm", ["triton", "torch"])
def test_backward_gemm_choices(monkeypatch, gemm):
    monkeypatch.setenv("RLCORE_BWD_GEMM", gemm)
    B, T, H, V = 3, 5, 24, 90
    batch = make_batch(B, T, H, V, dtype=torch.float32, seed=12)
    _, want = ground_truth(batch, "gspo_token")
    _, got = fused(batch, "gspo_token", dtype=torch.float32, strategy="single_pass", backend="triton",
                   chunk_budget=T * V)
    assert_close(got, want, 2e-5, gemm)


@pytest.mark.parametrize("gemm", ["triton", "torch"])
def test_bf16_single_pass_matches_two_pass(monkeypatch, gemm):
    """bf16 inputs: the single pass rounds dz to bf16 for its GEMMs as the two-pass backward does, so the two
    strategies agree to bf16 rounding of dz (their dz differ in the logits' recomputation only)."""
    monkeypatch.setenv("RLCORE_BWD_GEMM", gemm)
    B, T, H, V = 4, 8, 32, 130
    batch = make_batch(B, T, H, V, dtype=torch.float32, seed=13)
    _, one = fused(batch, "cispo", dtype=torch.bfloat16, strategy="single_pass", backend="triton",
                   chunk_budget=2 * T * V)
    _, two = fused(batch, "cispo", dtype=torch.bfloat16, strategy="two_pass", backend="triton")
    assert_close(one, two, 2e-2, f"bf16 {gemm}")


def test_all_masked_gives_zero_gradients():
    batch = make_batch(3, 4, 8, 20, dtype=torch.float32, seed=1)
    batch["mask"][:] = False
    out, got = fused(batch, "gspo", dtype=torch.float32, strategy="single_pass", backend="triton")
    assert out.loss.item() == 0.0
    assert all(torch.all(g == 0) for g in got[1:])


def test_auto_picks_the_triton_single_pass_when_sequences_fit(monkeypatch):
    from rlcore import fused as fused_module

    seen = []
    real = fused_module._single_pass
    monkeypatch.setattr(fused_module, "_single_pass", lambda *a, **k: seen.append(1) or real(*a, **k))
    batch = make_batch(2, 5, 8, 20, dtype=torch.float32, seed=2, ignore=False)
    batch["mask"][:] = True
    fused(batch, "ppo", dtype=torch.float32, backend="triton", chunk_budget=5 * 20)
    assert seen == [1]
    fused(batch, "ppo", dtype=torch.float32, backend="triton", chunk_budget=5 * 20 - 1)   # no longer fits
    assert seen == [1]


def test_single_pass_refuses_the_compiled_cpu_backend():
    batch = make_batch(2, 3, 4, 10, dtype=torch.float32, seed=0)
    h, w = batch["hidden"].requires_grad_(), batch["weight"]
    with pytest.raises(ValueError, match="single_pass"):
        rlcore.fused_policy_loss(h, w, batch["targets"], batch["advantages"], batch["mask"],
                                 old_logp=batch["old_logp"], strategy="single_pass", backend="cpp")
