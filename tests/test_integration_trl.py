"""``rlcore.integrations.trl.install``: TRL 1.16's ``GRPOTrainer`` on a tiny random Qwen2 with a tokenizer built here
(nothing downloaded), a few SGD steps with and without ``install``: the same logged losses (1e-6 relative to the
run's largest loss; FP32) and the
same parameters after the steps, over loss types, importance-sampling levels, ``beta``, ``delta``, tied and untied
heads and ``num_iterations=2``; both seams; the fallback warns once and gives TRL's own numbers. Skipped without
TRL."""

from __future__ import annotations

import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from rlcore.integrations import trl as rtrl  # noqa: E402

VOCAB = 28


def tokenizer():
    """A character-level tokenizer: ``<pad>``, ``<eos>`` and a-z."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{chr(97 + i): 2 + i for i in range(26)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def model(tied: bool):
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied,
                                   pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def reward(completions, **_):
    return [float(c.count("a") + 0.5 * c.count("e") - 0.1 * len(c)) for c in completions]


def run(tmp_path, settings, tied=True, install=None, steps=3, peft_config=None):
    """``(logged losses, parameters)`` after ``steps`` SGD steps; ``install``: None or ``install``'s keywords.
    FP32 throughout (``bf16=False``; TRL's default runs the CPU backbone and TRL's head under bf16 autocast)."""
    kw = dict(per_device_train_batch_size=4, num_generations=2, max_completion_length=6, max_steps=steps,
              learning_rate=0.5, optim="sgd", logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
              seed=0, lr_scheduler_type="constant", temperature=0.9, bf16=False,
              model_init_kwargs={"dtype": torch.float32})
    kw.update(settings)
    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), **kw)
    ds = datasets.Dataset.from_dict({"prompt": ["abc", "de", "fgh", "ij", "klm", "a"] * 4})
    path = tmp_path / f"model_tied{tied}"        # a local checkpoint: TRL builds the reference model from it
    if not path.exists():
        model(tied).save_pretrained(path)
    trainer = trl.GRPOTrainer(model=str(path), reward_funcs=reward, args=args, train_dataset=ds,
                              processing_class=tokenizer(), peft_config=peft_config)
    if install is not None:
        assert rtrl.install(trainer, **install) is trainer
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def assert_same(a, b):
    (la, pa), (lb, pb) = a, b
    assert len(la) == len(lb) > 0
    scale = max(max(abs(y) for y in lb), 1e-2)   # a step's loss can cancel to near 0: relative to the run's scale
    for x, y in zip(la, lb):
        assert abs(x - y) <= 1e-6 * scale, (la, lb)
    for name in pb:
        err = (pa[name] - pb[name]).abs().max().item() / max(pb[name].abs().max().item(), 1e-12)
        assert err <= 1e-5, f"{name}: {err:.2e}"


CASES = {
    "grpo": (dict(loss_type="grpo"), True),
    "dapo_beta": (dict(loss_type="dapo", beta=0.1), False),
    "dr_grpo_iter2": (dict(loss_type="dr_grpo", num_iterations=2), True),
    "bnpo_sequence_beta": (dict(loss_type="bnpo", importance_sampling_level="sequence", beta=0.05,
                                num_iterations=2), True),
    "cispo_iter2": (dict(loss_type="cispo", num_iterations=2, epsilon_high=1.1), False),
    "grpo_sequence_iter2_untied": (dict(loss_type="grpo", importance_sampling_level="sequence", num_iterations=2,
                                        learning_rate=2.0), False),
    "grpo_delta_iter2": (dict(loss_type="grpo", delta=1.05, num_iterations=2, epsilon=0.01), True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_head_match_trl(tmp_path, case):
    settings, tied = CASES[case]
    theirs = run(tmp_path, settings, tied)
    ours = run(tmp_path, settings, tied, install=dict(loss=True))
    assert_same(ours, theirs)


@pytest.mark.parametrize("seam", ["forward", "method"])
def test_head_only_both_seams(tmp_path, seam):
    settings = dict(loss_type="dapo", num_iterations=2, beta=0.1)
    theirs = run(tmp_path, settings, tied=False)
    ours = run(tmp_path, settings, tied=False, install=dict(loss=False, seam=seam))
    assert_same(ours, theirs)


def test_peft_lora_policy(tmp_path):
    """A LoRA policy (TRL wraps the model with PEFT; the head is found through the wrapper)."""
    peft = pytest.importorskip("peft")
    cfg = lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    settings = dict(loss_type="dapo", num_iterations=2, learning_rate=2.0)
    theirs = run(tmp_path, settings, peft_config=cfg())
    ours = run(tmp_path, settings, install=dict(loss=True), peft_config=cfg())
    assert any("lora" in n for n in theirs[1])
    assert_same(ours, theirs)


def test_fallback_warns_once_and_gives_trls_numbers(tmp_path):
    settings = dict(loss_type="grpo", top_entropy_quantile=0.5)
    theirs = run(tmp_path, settings)
    rtrl._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = run(tmp_path, settings, install=dict(loss=True))
    named = [w for w in caught if "top_entropy_quantile" in str(w.message)]
    assert len(named) == 1, [str(w.message) for w in caught]
    assert "using TRL's own loss" in str(named[0].message)
    assert_same(ours, theirs)


def test_loss_settings_mapping():
    class Args:
        delta = 2.0
        sapo_temperature_pos, sapo_temperature_neg = 1.0, 1.05
        use_bias_correction_kl = True

    class T:
        args, loss_type, importance_sampling_level = Args(), "grpo", "token"
        epsilon_low, epsilon_high, beta, max_completion_length = 0.2, 0.28, 0.04, 8
        off_policy_mask_threshold = None
        top_entropy_quantile, _entropy_bonus_enabled, aux_loss_enabled = 1.0, False, False

    t = T()
    assert rtrl.loss_settings(t) == ("ppo", dict(agg="seq-mean-token-mean", ratio_level="token", eps_low=0.2,
                                                 eps_high=0.28, dual_clip=2.0, beta=0.04, kl_estimator="k3",
                                                 kl_is_weighted=True))
    t.loss_type = "cispo"
    assert rtrl.loss_settings(t)[1]["eps_high"] == pytest.approx(0.28 - 1.0)
    t.loss_type = "vespo"
    with pytest.raises(rtrl.Unsupported, match="loss_type='vespo'"):
        rtrl.loss_settings(t)


def test_bad_input(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="needs a trl GRPOTrainer"):
        rtrl.install(object())
    monkeypatch.setattr(rtrl, "_version", lambda: "0.9.0")
    with pytest.raises(ValueError, match="supports TRL >= 0.17"):
        rtrl.install(object())


def test_memory_bench_runs_and_rlcore_is_smaller():
    """``python -m bench.trl_memory`` at a small size: both heads give the same loss, rlcore's step peaks lower
    (the committed figure at V = 32k is in ``bench/results/cpu-amd-epyc/trl_memory.json``)."""
    from bench import trl_memory

    res = trl_memory.measure(vocab=2048, hidden=32, batch=2, prompt=4, completion=60, device="cpu")
    assert res["loss_rlcore"] == pytest.approx(res["loss_trl"], rel=1e-5, abs=1e-7)
    assert res["peak_ratio_rlcore_over_trl"] < 1.0, res
