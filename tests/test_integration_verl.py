"""``rlcore.integrations.verl``: every registered ``rlcore_<loss_type>`` equals verl 0.9.1's own policy-loss function
on the same tensors and the same actor config (clip ratios, ``global_batch_info`` with ``dp_size > 1`` and global
counts, ``rollout_is_weights``): loss and gradient to 1e-6 relative. Skipped without verl."""

from __future__ import annotations

import pytest
import torch

core = pytest.importorskip("verl.trainer.ppo.core_algos")

from rlcore.integrations import verl as rv  # noqa: E402

F64 = torch.float64


def batch(seed=0, B=6, T=9):
    g = torch.Generator().manual_seed(seed)
    lp = -(torch.rand(B, T, generator=g, dtype=F64) * 2.5 + 0.05)
    old = (lp + 0.4 * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-1e-3)
    adv = torch.randn(B, generator=g, dtype=F64)[:, None].expand(B, T).contiguous()
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[:, 0] = True
    w = torch.rand(B, T, generator=g, dtype=F64) * 1.5 + 0.25
    return lp.requires_grad_(), old, adv, mask, w


def config(mode, settings, info):
    from verl.workers.config.actor import FSDPActorConfig, PolicyLossConfig

    loss_keys = ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio", "ppo_kl_coef", "dro_beta")
    loss_cfg = PolicyLossConfig(loss_mode=mode, **{k: v for k, v in settings.items() if k in loss_keys})
    actor = {k: v for k, v in settings.items() if k not in loss_keys}
    actor.setdefault("clip_ratio_low", 0.2)
    actor.setdefault("clip_ratio_high", 0.2)
    return FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, ppo_mini_batch_size=6,
                           clip_ratio=0.2, policy_loss=loss_cfg, global_batch_info=dict(info), **actor)


LOCAL = dict(dp_size=1)
GLOBAL = dict(dp_size=2, batch_num_tokens=97, global_batch_size=13, loss_scale_factor=9.0)

CASES = [
    # (verl loss_mode, config settings, rlcore loss_type, loss_agg_mode, global_batch_info)
    ("vanilla", {}, "ppo", "token-mean", LOCAL),
    ("vanilla", {}, "ppo", "token-mean", GLOBAL),
    ("vanilla", dict(clip_ratio_c=2.5, clip_ratio_high=0.28), "dapo", "token-mean", GLOBAL),
    ("vanilla", {}, "dr_grpo", "seq-mean-token-sum-norm", GLOBAL),
    ("vanilla", {}, "ppo", "seq-mean-token-sum-norm", dict(dp_size=1, global_batch_size=6)),
    ("vanilla", {}, "ppo", "seq-mean-token-sum", GLOBAL),
    ("vanilla", {}, "ppo", "seq-mean-token-mean", GLOBAL),
    ("vanilla", {}, "ppo", "token-sum", GLOBAL),
    ("gspo", dict(clip_ratio_low=3e-4, clip_ratio_high=4e-4), "gspo_token", "seq-mean-token-mean", GLOBAL),
    ("gspo", dict(clip_ratio_low=3e-4, clip_ratio_high=4e-4), "gspo", "seq-mean-token-mean", GLOBAL),
    ("sapo", dict(tau_pos=0.9, tau_neg=1.2), "sapo", "seq-mean-token-mean", GLOBAL),
    ("gpg", {}, "reinforce", "token-mean", GLOBAL),
    ("cispo", dict(clip_ratio_low=0.3, clip_ratio_high=0.25), "cispo", "token-mean", GLOBAL),
    ("dppo_tv", dict(clip_ratio_low=0.05, clip_ratio_high=0.08), "dppo_tv", "token-mean", GLOBAL),
    ("dppo_kl", dict(clip_ratio_low=0.01, clip_ratio_high=0.02), "dppo_kl", "token-mean", GLOBAL),
    ("geo_mean", dict(clip_ratio_low=0.4, clip_ratio_high=0.4), "gmpo", "token-mean", dict(dp_size=1,
                                                                                           global_batch_size=6)),
    ("dro", dict(dro_beta=0.7), "dro", "token-mean", GLOBAL),
    ("clip_cov", dict(clip_cov_ratio=1.0, clip_cov_lb=-0.3, clip_cov_ub=0.3), "clip_cov", "token-mean", GLOBAL),
    ("kl_cov", dict(kl_cov_ratio=0.2, ppo_kl_coef=1.0), "kl_cov", "token-mean", GLOBAL),
]


def close(a, b, what, rtol=1e-6):
    scale = max(b.abs().max().item(), 1e-12)
    err = (a - b).abs().max().item() / scale
    assert err <= rtol, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("with_is", [False, True], ids=["no_is", "rollout_is"])
@pytest.mark.parametrize("mode,settings,loss_type,agg,info", CASES,
                         ids=[f"{c[0]}-{c[2]}-{c[3]}-dp{c[4]['dp_size']}" for c in CASES])
def test_registered_loss_equals_verls_own(mode, settings, loss_type, agg, info, with_is):
    lp, old, adv, mask, w = batch(1)
    if mode == "geo_mean" and with_is:
        pytest.skip("verl's geo_mean folds the IS weights into a per-sequence geometric mean; rlcore's gmpo takes "
                    "sampler_logp for that (is_mode), not token_weights")
    if loss_type == "gspo" and with_is:
        pytest.skip("verl's gspo is rlcore's gspo_token; the sequence-level gspo equals it only without per-token "
                    "weights (with them its gradient is shared by the sequence's tokens)")
    weights = w if with_is else None
    ours_fn = core.get_policy_loss_fn(rv.PREFIX + loss_type)
    theirs_fn = core.get_policy_loss_fn(mode)
    cfg = config(mode, settings, info)
    theirs, _ = theirs_fn(old, lp, adv, mask.to(F64), loss_agg_mode=agg, config=cfg, rollout_is_weights=weights)
    cfg = config(mode, settings, info)
    ours, metrics = ours_fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask, loss_agg_mode=agg,
                            config=cfg, rollout_is_weights=weights)
    close(ours, theirs, f"{loss_type} loss")
    g_ours, = torch.autograd.grad(ours, lp, retain_graph=True)
    g_theirs, = torch.autograd.grad(theirs, lp)
    close(g_ours, g_theirs, f"{loss_type} grad")
    assert all(isinstance(v, float) for v in metrics.values()) and f"actor/{rv.PREFIX}loss" in metrics


def test_every_clipped_loss_is_registered_and_the_regression_family_is_not():
    import rlcore

    names = rv.registered()
    for loss_type, spec in rlcore.LOSSES.items():
        if spec.family == "clipped":
            assert names.get(rv.PREFIX + loss_type) == loss_type
            assert core.get_policy_loss_fn(rv.PREFIX + loss_type).__name__ == rv.PREFIX + loss_type
        else:
            with pytest.raises(ValueError, match="Unsupported loss mode"):
                core.get_policy_loss_fn(rv.PREFIX + loss_type)
    with pytest.raises(ValueError, match="verl's policy-loss signature does not pass"):
        rv.register("my_apo", "apo")
    with pytest.raises(ValueError, match="unknown loss_type"):
        rv.register("x", "nope")


def test_register_with_fixed_options():
    lp, old, adv, mask, _ = batch(2)
    rv.register("rlcore_ppo_noclip", "ppo", eps_low=10.0, eps_high=10.0, dual_clip=None)
    cfg = config("vanilla", {}, LOCAL)
    loss, _ = core.get_policy_loss_fn("rlcore_ppo_noclip")(old, lp, adv, mask, "token-mean", cfg)
    m = mask.to(F64)
    ref = (-(torch.exp(lp - old) * adv) * m).sum() / m.sum()
    close(loss, ref, "unclipped")


def test_bad_input():
    lp, old, adv, mask, _ = batch(3)
    fn = core.get_policy_loss_fn("rlcore_ppo")
    with pytest.raises(ValueError, match="batch_num_tokens'] is required when dp_size > 1"):
        fn(old, lp, adv, mask, "token-mean", config("vanilla", {}, dict(dp_size=4)))
    with pytest.raises(ValueError, match="actor config is required"):
        fn(old, lp, adv, mask, "token-mean", None)
    varying = adv + torch.randn_like(adv)
    with pytest.raises(ValueError, match="use rlcore_gspo_token"):
        core.get_policy_loss_fn("rlcore_gspo")(old, lp, varying, mask, "seq-mean-token-mean",
                                              config("gspo", {}, LOCAL))


def test_loads_through_verls_external_module_hook():
    """``VERL_USE_EXTERNAL_MODULES`` (read by ``import verl`` in each Ray worker) registers the losses."""
    import os
    import subprocess
    import sys

    code = ("import verl; from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as R; "
            "print(sorted(k for k in R if k.startswith('rlcore_')))")
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="rlcore.integrations.verl")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'rlcore_gspo'" in out.stdout and "'rlcore_ppo'" in out.stdout, out.stdout


def _tiny_qwen2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def test_rlcore_impl_backend_equals_verls_torch_backend_on_a_packed_batch():
    """``impl_backend="rlcore"`` through verl's own ``patch_forward_with_backends``: log-probs, entropies and every
    parameter gradient equal verl's ``"torch"`` backend on a packed ``[1, nnz]`` batch (two sequences, position ids
    restarting, as verl's remove-padding path feeds it)."""
    from verl.models.transformers import monkey_patch

    ids = torch.randint(0, 80, (1, 13))
    pos = torch.cat([torch.arange(6), torch.arange(7)])[None]
    results = []
    for backend in ("torch", "rlcore"):
        model = _tiny_qwen2()
        cls = type(model)
        saved = cls.forward
        try:
            monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend=backend)
            assert model._verl_fused_kernels_backend == backend
            assert (cls.forward is rv.forward_with_rlcore_backend) == (backend == "rlcore")
            out = model(input_ids=ids, position_ids=pos, temperature=0.8, return_dict=True, use_cache=False)
            g1, g2 = torch.linspace(-1, 1, 13)[None], torch.linspace(1, 0, 13)[None]
            grads = torch.autograd.grad((out.log_probs * g1 + out.entropy * g2).sum(), list(model.parameters()))
            results.append((out.log_probs.detach(), out.entropy.detach(), grads))
        finally:
            cls.forward = saved
    (lp_t, ent_t, g_t), (lp_r, ent_r, g_r) = results
    assert lp_r.shape == (1, 13)
    torch.testing.assert_close(lp_r, lp_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent_r, ent_t, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_r, g_t):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
