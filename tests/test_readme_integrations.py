"""The README's "In your trainer" code blocks run as written, on the names each block says it expects (a tiny model
built here, a TRL trainer, verl), and do what the README says. Each is skipped without its library."""

from __future__ import annotations

import pathlib
import re
import textwrap

import pytest
import torch


def block(marker: str) -> str:
    """The one ```python block of the README's "In your trainer" section that contains ``marker``."""
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("## In your trainer", 1)[1].split("\n## ", 1)[0]
    found = [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", section, re.S) if marker in b]
    assert len(found) == 1, f"expected one README block with {marker!r}, found {len(found)}"
    return found[0]


def test_hf_block():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    input_ids = torch.randint(0, 64, (2, 7))
    attention_mask = torch.ones_like(input_ids)
    scope = dict(model=model, input_ids=input_ids, attention_mask=attention_mask)
    exec(block("hf.head_of(model)"), scope)
    ls = (model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1] / 0.7).log_softmax(-1)
    want = ls.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(scope["logp"], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scope["entropy"], -(ls.exp() * ls).sum(-1), rtol=1e-5, atol=1e-6)


def test_trl_block(tmp_path):
    pytest.importorskip("trl")
    from . import test_integration_trl as t

    import trl

    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2,
                          max_completion_length=4, max_steps=1, report_to="none", use_cpu=True, bf16=False,
                          save_strategy="no")
    ds = __import__("datasets").Dataset.from_dict({"prompt": ["ab", "cd"]})
    trainer = trl.GRPOTrainer(model=t.model(True), reward_funcs=t.reward, args=args, train_dataset=ds,
                              processing_class=t.tokenizer())
    before = trainer
    scope = dict(trainer=trainer)
    exec(block("integrations.trl.install"), scope)
    seam = "forward" if t.has_fused_head() else "method"         # TRL 1.16's fused forward, TRL 0.20's method
    assert scope["trainer"] is before and scope["trainer"]._rlcore_seam == seam
    assert "_compute_loss" in vars(scope["trainer"])           # loss=True replaced the loss
    scope["trainer"].train()


def test_verl_block():
    pytest.importorskip("verl.trainer.ppo.core_algos")
    scope: dict = {}
    exec(block("rlcore.integrations.verl"), scope)
    assert scope["loss_fn"].__name__ == "rlcore_gspo"


def test_openrlhf_block():
    scope: dict = {}
    exec(block("rlcore.integrations.openrlhf import PolicyLoss"), scope)
    from rlcore.integrations import openrlhf

    assert isinstance(scope["loss_fn"], openrlhf.PolicyLoss) and scope["loss_fn"].dual_clip == 3.0
