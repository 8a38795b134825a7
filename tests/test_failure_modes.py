"""The loss side's silent or unclear cases: each gets a clear error or a defined, documented result.

num_tokens of 0 or a string, gspo_token's clamp, out-of-range targets at masked positions under both fused
strategies, an all -inf bias, ignore_index beyond int64, double backward, meta tensors, the ``-100`` pitfall, and
peers' loss names.
"""

import pytest
import torch

import rlcore
from rlcore.reference import linear_logprobs_reference


def _head(N=8, H=16, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (N,), generator=g)
    return h, w, t


CU = torch.tensor([0, 3, 8], dtype=torch.int32)
ADV = torch.tensor([1.0, -0.5], dtype=torch.float64)


def _padded():
    g = torch.Generator().manual_seed(1)
    lp = (-1.0 - torch.rand(2, 5, generator=g, dtype=torch.float64))
    return lp, lp + 0.05, torch.tensor([1.0, -1.0], dtype=torch.float64), torch.ones(2, 5, dtype=torch.bool)


# ----------------------------------------------------------------------------------------------------------------------
# num_tokens, the clamp
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, err, match", [
    (0, ValueError, "num_tokens must be > 0, got 0"),
    (-3, ValueError, "num_tokens must be > 0, got -3"),
    ("5", TypeError, "num_tokens must be a number or a 0-d tensor, got str '5'"),
    (float("nan"), ValueError, "num_tokens must be a finite real number"),
])
def test_num_tokens_is_checked_not_clamped(value, err, match):
    lp, old, adv, mask = _padded()
    with pytest.raises(err, match=match):
        rlcore.policy_loss(lp, adv, mask, old_logp=old, num_tokens=value)


def test_gspo_token_treats_the_log_ratio_clamp_like_gspo():
    """Past the log-ratio clamp (l - l_old = 30 > 20) GSPO's sequence ratio is constant: gradient 0. gspo_token's
    gradient is GSPO's, so 0 too (it was 2e7)."""
    lp, _, adv, mask = _padded()
    grads = {}
    for loss_type in ("gspo", "gspo_token"):
        l = lp.clone().requires_grad_(True)
        out = rlcore.policy_loss(l, adv, mask, old_logp=lp - 30.0, loss_type=loss_type)
        (grads[loss_type],) = torch.autograd.grad(out.loss, [l])
    assert torch.equal(grads["gspo"], torch.zeros_like(lp))
    assert torch.equal(grads["gspo_token"], grads["gspo"])


# ----------------------------------------------------------------------------------------------------------------------
# the fused strategies agree on targets at masked positions
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", [11, 10**6, -7])
def test_out_of_range_target_at_a_masked_position_is_never_read(bad_id):
    """Both strategies ignore it (no row but a loss row is read), with equal values and gradients, equal to the
    float64 loss without that row; at a loss position both raise."""
    h, w, t = _head()
    t[4] = bad_id
    mask = torch.ones(8, dtype=torch.bool)
    mask[4] = False
    old = torch.full((8,), -2.0, dtype=torch.float64)
    results = {}
    for strategy in ("two_pass", "single_pass"):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = rlcore.fused_policy_loss(hh, ww, t, ADV, mask, cu_seqlens=CU, old_logp=old, loss_type="gspo",
                                       strategy=strategy, backend="torch")
        results[strategy] = (out.loss, *torch.autograd.grad(out.loss, [hh, ww]))
    safe = t.clone()
    safe[4] = 0
    lp = linear_logprobs_reference(h, w, safe, compute_dtype=torch.float64)
    want = rlcore.policy_loss(lp, ADV, mask, cu_seqlens=CU, old_logp=old, loss_type="gspo").loss
    for a, b in zip(results["two_pass"], results["single_pass"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(results["two_pass"][0], want, rtol=1e-10, atol=1e-12)
    mask[4] = True
    for strategy in ("two_pass", "single_pass"):
        with pytest.raises(ValueError, match=f"targets: id {bad_id} is outside"):
            rlcore.fused_policy_loss(h, w, t, ADV, mask, cu_seqlens=CU, old_logp=old, loss_type="gspo",
                                     strategy=strategy, backend="torch")


# ----------------------------------------------------------------------------------------------------------------------
# the head: -inf bias, ignore_index, double backward, meta
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_a_bias_that_is_minus_inf_everywhere_is_an_error(backend):
    h, w, t = _head()
    h, w = h.float(), w.float()
    with pytest.raises(ValueError, match="bias is -inf for every vocabulary entry"):
        rlcore.linear_logprobs(h, w, t, bias=torch.full((11,), float("-inf")), backend=backend)
    with pytest.raises(ValueError, match="bias is -inf for every vocabulary entry"):
        rlcore.fused_policy_loss(h, w, t, ADV.float(), None, cu_seqlens=CU, bias=torch.full((11,), float("-inf")),
                                 old_logp=torch.full((8,), -2.0), loss_type="gspo", strategy="single_pass",
                                 backend="torch")
    # one finite entry left: a defined distribution (that entry has probability 1, the others 0)
    bias = torch.full((11,), float("-inf"))
    bias[3] = 0.0
    t2 = torch.full((8,), 3)
    lp, ent = rlcore.linear_logprobs(h, w, t2, bias=bias, return_entropy=True, backend=backend)
    assert torch.equal(lp, torch.zeros(8)) and torch.equal(ent, torch.zeros(8))


def test_ignore_index_beyond_int64_is_named():
    h, w, t = _head()
    for value in (2**70, -(2**63) - 1):
        with pytest.raises(ValueError, match="ignore_index must fit in int64"):
            rlcore.linear_logprobs(h, w, t, ignore_index=value)
    rlcore.linear_logprobs(h, w, t, ignore_index=2**63 - 1)           # the edge is fine


def test_double_backward_is_a_clear_error_and_first_order_with_create_graph_works():
    h, w, t = _head()
    h = h.requires_grad_(True)
    (g,) = torch.autograd.grad(rlcore.linear_logprobs(h, w, t).sum(), [h], create_graph=True)
    (g_ref,) = torch.autograd.grad(linear_logprobs_reference(h, w, t).sum(), [h])
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10)
    with pytest.raises(RuntimeError, match="has no second derivative.*linear_logprobs_reference"):
        g.sum().backward()


def test_meta_inputs_give_shapes():
    """A shape-only run: every function returns meta results of the right shape (no value is read); the single
    pass, which slices the batch by the mask's values, says why it cannot."""
    h, w, t = (x.to("meta") for x in _head())
    lp, ent = rlcore.linear_logprobs(h, w, t, return_entropy=True)
    assert lp.device.type == "meta" and lp.shape == (8,) and ent.shape == (8,)
    cu, adv, old = CU.to("meta"), ADV.to("meta"), torch.empty(8, dtype=torch.float64, device="meta")
    out = rlcore.policy_loss(lp, adv, None, cu_seqlens=cu, old_logp=old, loss_type="gspo")
    assert out.loss.device.type == "meta" and out.loss.shape == ()
    for strategy in ("auto", "two_pass"):
        out = rlcore.fused_policy_loss(h, w, t, adv, None, cu_seqlens=cu, old_logp=old, loss_type="gspo",
                                       strategy=strategy, backend="torch")
        assert out.loss.device.type == "meta"
    with pytest.raises(ValueError, match="single_pass.*meta tensors have none"):
        rlcore.fused_policy_loss(h, w, t, adv, None, cu_seqlens=cu, old_logp=old, loss_type="gspo",
                                 strategy="single_pass", backend="torch")


# ----------------------------------------------------------------------------------------------------------------------
# the -100 pitfall
# ----------------------------------------------------------------------------------------------------------------------


def test_targets_make_policy_loss_skip_ignored_positions_like_the_fused_loss():
    """Targets padded with -100 give log-prob 0 there. policy_loss(targets=...) drops those positions from the mask
    (with or without a mask), and equals fused_policy_loss; without targets, an all-ones mask counts them."""
    h, w, t = _head()
    t[:2] = -100
    t[6] = -100
    ones = torch.ones(8, dtype=torch.bool)
    lp = rlcore.linear_logprobs(h, w, t)
    assert torch.equal(lp[t == -100], torch.zeros(3, dtype=torch.float64))
    old = lp.detach() - 0.1
    kw = dict(cu_seqlens=CU, old_logp=old, loss_type="cispo")
    fused = rlcore.fused_policy_loss(h, w, t, ADV, ones, **kw).loss
    for mask in (ones, None, ones.to(torch.int64)):
        got = rlcore.policy_loss(lp, ADV, mask, targets=t, **kw)
        torch.testing.assert_close(got.loss, fused, rtol=1e-12, atol=1e-12)
        assert int(got.metrics["num_tokens"]) == 5
    explicit = rlcore.policy_loss(lp, ADV, t != -100, **kw).loss
    torch.testing.assert_close(explicit, fused, rtol=1e-12, atol=1e-12)
    counted = rlcore.policy_loss(lp, ADV, ones, **kw)                  # the pitfall, still what a mask of ones says
    assert int(counted.metrics["num_tokens"]) == 8
    # another ignore_index
    t7 = torch.where(t == -100, -1, t)
    got = rlcore.policy_loss(lp, ADV, ones, targets=t7, ignore_index=-1, **kw).loss
    torch.testing.assert_close(got, fused, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("targets, kw, err, match", [
    (torch.zeros(8), {}, TypeError, "targets must be an integer tensor of token ids, got a torch.float32"),
    (torch.zeros(7, dtype=torch.long), {}, ValueError, r"targets must have logp's shape \(8,\), got \(7,\)"),
    (torch.zeros(8, dtype=torch.long), dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
])
def test_bad_targets_are_named(targets, kw, err, match):
    lp = torch.full((8,), -1.0, dtype=torch.float64)
    with pytest.raises(err, match=match):
        rlcore.policy_loss(lp, ADV, None, cu_seqlens=CU, old_logp=lp, targets=targets, **kw)


# ----------------------------------------------------------------------------------------------------------------------
# peers' names
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, says, equivalent", [
    ("grpo", "TRL's loss_type='grpo' is loss_type='ppo' with agg='seq-mean-token-mean'",
     dict(loss_type="ppo", agg="seq-mean-token-mean")),
    ("bnpo", "TRL's loss_type='bnpo' is loss_type='ppo'", dict(loss_type="ppo")),
    ("vanilla", "verl's loss_mode='vanilla' is loss_type='ppo'", dict(loss_type="ppo")),
    ("gpg", "verl's loss_mode='gpg' is loss_type='reinforce'", dict(loss_type="reinforce")),
])
def test_peers_names_say_which_rlcore_loss_they_are(name, says, equivalent):
    lp, old, adv, mask = _padded()
    with pytest.raises(ValueError, match=f"unknown loss_type '{name}': {says}"):
        rlcore.policy_loss(lp, adv, mask, old_logp=old, loss_type=name)
    kw = {k: v for k, v in equivalent.items()}
    if kw["loss_type"] == "reinforce":
        assert torch.isfinite(rlcore.policy_loss(lp, adv, mask, **kw).loss)
    else:
        assert torch.isfinite(rlcore.policy_loss(lp, adv, mask, old_logp=old, **kw).loss)
