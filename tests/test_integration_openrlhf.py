"""``rlcore.integrations.openrlhf.PolicyLoss`` against OpenRLHF 0.11.2's own ``PolicyLoss`` on the same tensors and
settings: ppo and gspo, token- and sequence-level aggregation, dual clip, global counts with ``dp_size``, and the
token-level ratio mask of the vLLM correction: the loss and its gradient to 1e-6 relative, and the returned metrics.
OpenRLHF's ``loss.py`` is loaded without its package ``__init__`` (which imports flash-attn, a GPU-only build);
skipped where OpenRLHF (or the deepspeed its ``models/utils.py`` imports) is not installed."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import pathlib
import sys
import types

import pytest
import torch

from rlcore.integrations.openrlhf import PolicyLoss

F64 = torch.float64


def _theirs():
    spec = importlib.util.find_spec("openrlhf")
    if spec is None:
        pytest.skip("openrlhf is not installed")
    pytest.importorskip("deepspeed")
    if "openrlhf.models" not in sys.modules:
        pkg = types.ModuleType("openrlhf.models")
        pkg.__path__ = [str(pathlib.Path(spec.origin).parent / "models")]
        pkg.__spec__ = importlib.machinery.ModuleSpec("openrlhf.models", None, is_package=True)
        importlib.import_module("openrlhf")
        sys.modules["openrlhf.models"] = pkg
    return importlib.import_module("openrlhf.models.loss").PolicyLoss


def batch(seed=0, B=6, T=9):
    g = torch.Generator().manual_seed(seed)
    lp = -(torch.rand(B, T, generator=g, dtype=F64) * 2.5 + 0.05)
    old = (lp + 0.4 * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-1e-3)
    rollout = (old + 0.5 * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-1e-3)
    adv = torch.randn(B, generator=g, dtype=F64)[:, None].expand(B, T).contiguous()
    mask = (torch.rand(B, T, generator=g) < 0.8).to(F64)
    mask[:, 0] = 1
    return lp.requires_grad_(), old, rollout, adv, mask


CASES = [
    dict(),
    dict(clip_eps_high=0.28, dual_clip=3.0),
    dict(token_level_loss=False, dual_clip=2.0),
    dict(is_correction_level="token", is_correction_threshold=(0.5, 2.0)),
    dict(policy_loss_type="gspo", clip_eps_low=3e-4, clip_eps_high=4e-4),
    dict(policy_loss_type="gspo", clip_eps_low=0.05, clip_eps_high=0.05, is_correction_level="token"),
]
COUNTS = [dict(), dict(dp_size=2, batch_num_tokens=97.0, global_batch_size=13.0)]


def close(a, b, what, rtol=1e-6):
    a, b = torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64)
    err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)
    assert err <= rtol, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("counts", COUNTS, ids=["local", "global"])
@pytest.mark.parametrize("kw", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) or "defaults" for c in CASES])
def test_drop_in_equals_openrlhf(kw, counts):
    Theirs = _theirs()
    lp, old, rollout, adv, mask = batch(1)
    theirs = Theirs(**kw)(lp, old, adv, mask, rollout, **counts)
    ours = PolicyLoss(**kw)(lp, old, adv, mask, rollout, **counts)
    assert len(ours) == len(theirs) == 5
    close(ours[0], theirs[0], "loss")
    g_ours, = torch.autograd.grad(ours[0], lp, retain_graph=True)
    g_theirs, = torch.autograd.grad(theirs[0], lp)
    close(g_ours, g_theirs, "grad")
    for name, a, b in zip(("clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio"), ours[1:], theirs[1:]):
        assert (a is None) == (b is None), name
        if b is not None:
            close(a, b, name)


def test_unsupported_settings_raise_naming_them():
    for kw, name in ((dict(is_correction_level="seq"), "is_correction_level='seq'"),
                     (dict(is_correction_level="token", is_correction_mode="clip"), "is_correction_mode='clip'"),
                     (dict(is_correction_level="token", is_correction_gating="tv", is_correction_threshold=(0, 1)),
                      "is_correction_gating='tv'")):
        with pytest.raises(ValueError, match=name):
            PolicyLoss(**kw)
    with pytest.raises(ValueError, match="policy_loss_type"):
        PolicyLoss(policy_loss_type="grpo")
    with pytest.raises(ValueError, match="dual_clip must be > 1.0"):
        PolicyLoss(dual_clip=0.5)
    lp, old, rollout, adv, mask = batch(2)
    with pytest.raises(ValueError, match="rollout_log_probs is required"):
        PolicyLoss(is_correction_level="token")(lp, old, adv, mask)
    with pytest.raises(ValueError, match="one advantage per sequence"):
        PolicyLoss(policy_loss_type="gspo")(lp, old, adv + torch.randn_like(adv), mask)


def test_patch_swaps_the_class_openrlhf_imported():
    _theirs()
    from rlcore.integrations import openrlhf as ours

    mod = importlib.import_module("openrlhf.models.loss")
    saved = mod.PolicyLoss
    try:
        ours.patch()
        assert mod.PolicyLoss is ours.PolicyLoss
    finally:
        mod.PolicyLoss = saved
        actor = sys.modules.get("openrlhf.models.actor")
        if actor is not None and hasattr(actor.Actor, "_rlcore_original_forward"):
            actor.Actor.forward = actor.Actor._rlcore_original_forward
            del actor.Actor._rlcore_original_forward


def _actor_module():
    """OpenRLHF's ``models/actor.py``, imported with flash-attn's two padding/gather modules stubbed: the unpacked
    path tested here never calls them (they serve packed samples and ring attention only)."""
    _theirs()
    pytest.importorskip("peft")
    for name, attrs in (("flash_attn", {}), ("flash_attn.bert_padding", dict(index_first_axis=None, pad_input=None,
                                                                             rearrange=None, unpad_input=None)),
                        ("flash_attn.utils", {}), ("flash_attn.utils.distributed", dict(all_gather=None))):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            mod.__path__ = []
            mod.__dict__.update(attrs)
            sys.modules[name] = mod
    return importlib.import_module("openrlhf.models.actor")


def test_patched_actor_forward_equals_the_original_on_an_unpacked_batch():
    actor_mod = _actor_module()
    transformers = pytest.importorskip("transformers")
    from rlcore.integrations import openrlhf as ours

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=90, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    lm = transformers.AutoModelForCausalLM.from_config(cfg)
    actor = actor_mod.Actor(lm, temperature=0.8)
    actor.packing_samples = False         # OpenRLHF sets it only when it loads the model from a path
    seqs = torch.randint(1, 90, (3, 12))
    am = torch.ones_like(seqs)
    am[0, :3] = 0                                             # left padding
    action_mask = torch.ones(3, 5)
    action_mask[2, 3:] = 0
    Actor = actor_mod.Actor
    runs = []
    for patched in (False, True):
        if patched:
            ours.patch()
            assert Actor.forward is ours.actor_forward
        try:
            lp, out = actor(seqs, action_mask=action_mask, attention_mask=am, return_output=True,
                            return_entropy=True)
            full = actor(seqs, attention_mask=am, return_logprobs=True)
            g = torch.autograd.grad((lp * torch.linspace(-1, 1, 5)).sum() + out.entropy.sum(), list(lm.parameters()))
            runs.append((lp.detach(), out.entropy.detach(), full.detach(), g, out.logits))
        finally:
            if patched:
                Actor.forward = Actor._rlcore_original_forward
                del Actor._rlcore_original_forward
    (lp0, e0, f0, g0, logits0), (lp1, e1, f1, g1, logits1) = runs
    assert logits0 is not None and logits1 is None           # the patched forward never formed the logits
    torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f1, f0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
