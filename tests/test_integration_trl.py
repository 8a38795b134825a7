"""``rlcore.integrations.trl.install``: the installed TRL's ``GRPOTrainer`` (CI: TRL 1.16.0 with its fused-forward
seam, TRL 0.20.0 with the ``_get_per_token_logps_and_entropies`` seam) on a tiny random Qwen2 with a tokenizer built
here (nothing downloaded), a few SGD steps with and without ``install``: the same logged losses (1e-6 relative to the
run's largest loss; FP32) and the same parameters after the steps, over loss types, importance-sampling levels,
``beta``, ``delta``, tied and untied heads, ``num_iterations=2`` and gradient accumulation; both seams; the fallback
warns once and gives TRL's own numbers. A case the installed TRL lacks (a loss type its ``_compute_loss`` does not
name, a ``GRPOConfig`` field it does not have) is skipped saying so. Skipped without TRL."""

from __future__ import annotations

import dataclasses
import inspect
import re
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from rlcore.integrations import trl as rtrl  # noqa: E402

VOCAB = 28
TRL = trl.__version__


def trl_loss_types() -> set:
    """The loss types the installed TRL's ``GRPOTrainer._compute_loss`` names (its ``loss_type ==`` / ``in`` tests)."""
    lines = [ln for ln in inspect.getsource(trl.GRPOTrainer._compute_loss).splitlines()
             if re.search(r"self\.loss_type (==|in)", ln)]
    return set(re.findall(r'"(\w+)"', "\n".join(lines)))


def has_fused_head() -> bool:
    import trl.trainer.utils as utils

    return hasattr(utils, "add_fused_lm_head")


def skip_unless_trl_has(settings) -> None:
    """Skip, naming what is missing, a case the installed TRL cannot run."""
    fields = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    missing = sorted(k for k in settings if k not in fields)
    if missing:
        pytest.skip(f"TRL {TRL}'s GRPOConfig has no {missing}")
    if settings.get("loss_type", "grpo") not in trl_loss_types():
        pytest.skip(f"TRL {TRL}'s GRPOTrainer has no loss_type={settings['loss_type']!r} "
                    f"(it has {sorted(trl_loss_types())})")
    since = rtrl._LOSS_SINCE.get(settings.get("loss_type", "grpo"))
    if since is not None and not rtrl._at_least(TRL, since):
        pytest.skip(f"rlcore computes TRL's loss_type={settings['loss_type']!r} from TRL {since}; TRL {TRL} keeps "
                    f"its own loss (test_fallback_warns_once_and_gives_trls_numbers)")


def tokenizer():
    """A character-level tokenizer: ``<pad>``, ``<eos>`` and a-z."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{chr(97 + i): 2 + i for i in range(26)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                model_input_names=["input_ids", "attention_mask"])


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
    transformers.set_seed(0)   # TRL 0.20 draws the LoRA init before seeding (1.16 seeds first): same init both runs
    trainer = trl.GRPOTrainer(model=str(path), reward_funcs=reward, args=args, train_dataset=ds,
                              processing_class=tokenizer(), peft_config=peft_config)
    if install is not None:
        assert rtrl.install(trainer, **install) is trainer
        auto = "forward" if has_fused_head() else "method"          # the installed TRL's seam
        assert trainer._rlcore_seam == (auto if install.get("seam", "auto") == "auto" else install["seam"])
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
    "bnpo_accum2_beta": (dict(loss_type="bnpo", gradient_accumulation_steps=2, beta=0.1, learning_rate=2.0), True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_head_match_trl(tmp_path, case):
    """``loss=True`` computes rlcore's loss (no fallback warning) and matches TRL's own."""
    settings, tied = CASES[case]
    skip_unless_trl_has(settings)
    theirs = run(tmp_path, settings, tied)
    rtrl._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = run(tmp_path, settings, tied, install=dict(loss=True))
    fallbacks = [str(w.message) for w in caught if "no exact rlcore equivalent" in str(w.message)]
    assert not fallbacks, fallbacks
    assert_same(ours, theirs)


@pytest.mark.parametrize("seam", ["forward", "method"])
def test_head_only_both_seams(tmp_path, seam):
    """TRL's own loss on rlcore's head; the forward seam only where TRL has its fused LM head (refused otherwise)."""
    loss_type = "dapo" if "dapo" in trl_loss_types() else "bnpo"
    settings = dict(loss_type=loss_type, num_iterations=2, beta=0.1)
    theirs = run(tmp_path, settings, tied=False)
    if seam == "forward" and not has_fused_head():
        with pytest.raises(ValueError, match="seam='forward' needs TRL's fused LM head"):
            run(tmp_path, settings, tied=False, install=dict(loss=False, seam=seam), steps=0)
        return
    ours = run(tmp_path, settings, tied=False, install=dict(loss=False, seam=seam))
    assert_same(ours, theirs)


def test_peft_lora_policy(tmp_path):
    """A LoRA policy (TRL wraps the model with PEFT; the head is found through the wrapper)."""
    peft = pytest.importorskip("peft")
    cfg = lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    dapo = "dapo" in trl_loss_types() and rtrl._at_least(TRL, rtrl._LOSS_SINCE["dapo"])    # rlcore computes it
    settings = dict(loss_type="dapo" if dapo else "bnpo", num_iterations=2, learning_rate=2.0)
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


def test_method_seam_hands_vision_inputs_to_trl():
    """A batch with images goes to TRL's own ``_get_per_token_logps_and_entropies``, called as the installed TRL's
    signature allows (TRL 0.20's has no ``compute_aux_loss``)."""
    signature = inspect.signature(trl.GRPOTrainer._get_per_token_logps_and_entropies)
    calls = []

    def original(*args, **kwargs):
        signature.bind(None, *args, **kwargs)                                # TypeError on a keyword TRL lacks
        calls.append((args, kwargs))
        return "trl's"

    method = rtrl._per_token_logps_method(object(), original)
    ids = torch.ones(2, 5, dtype=torch.long)
    pixels = torch.zeros(2, 3, 4, 4)
    assert method(None, ids, ids, 3, compute_entropy=True, pixel_values=pixels) == "trl's"
    (args, kwargs), = calls
    assert args[3] == 3 and kwargs["compute_entropy"] is True and kwargs["pixel_values"] is pixels


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
    assert rtrl.loss_settings(t, "1.16.0") == ("ppo", dict(agg="seq-mean-token-mean", ratio_level="token", eps_low=0.2,
                                                 eps_high=0.28, dual_clip=2.0, beta=0.04, kl_estimator="k3",
                                                 kl_is_weighted=True))
    assert rtrl.loss_settings(t, "0.20.0") == rtrl.loss_settings(t, "1.16.0")
    t.loss_type = "cispo"
    assert rtrl.loss_settings(t, "1.16.0")[1]["eps_high"] == pytest.approx(0.28 - 1.0)
    t.loss_type = "dapo"
    with pytest.raises(rtrl.Unsupported, match=r"loss_type='dapo' on TRL 0\.29\.1 \(rlcore reproduces .* 1\.10"):
        rtrl.loss_settings(t, "0.29.1")
    t.loss_type = "vespo"
    with pytest.raises(rtrl.Unsupported, match="loss_type='vespo'"):
        rtrl.loss_settings(t, "1.16.0")


def test_loss_table_matches_the_installed_trl():
    """Every loss type rlcore computes for the installed TRL is one that TRL's ``_compute_loss`` names."""
    claimed = {t for t, since in rtrl._LOSS_SINCE.items() if rtrl._at_least(TRL, since)}
    assert {"grpo", "bnpo", "dr_grpo"} <= claimed
    assert claimed <= trl_loss_types() | {"grpo"}, (TRL, claimed - trl_loss_types())


def test_accumulation_division_by_version():
    """Where TRL's ``_compute_loss`` divides by the accumulation steps (read from each release's source)."""
    assert not rtrl._divides_by_accumulation("0.21.0", True)
    assert rtrl._divides_by_accumulation("0.22.0", True) and rtrl._divides_by_accumulation("0.27.0", False)
    assert rtrl._divides_by_accumulation("1.16.0", True) and not rtrl._divides_by_accumulation("0.27.1", False)


def test_bad_input(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="needs a trl GRPOTrainer"):
        rtrl.install(object())
    for old in ("0.9.0", "0.19.1", "2.0.0"):          # 0.19 has _get_per_token_logps only
        monkeypatch.setattr(rtrl, "_version", lambda: old)
        with pytest.raises(ValueError, match=rf"supports TRL >= 0\.20 and < 2 .*this is TRL {re.escape(old)}"):
            rtrl.install(object())


def test_memory_bench_runs_and_rlcore_is_smaller():
    """``python -m bench.trl_memory`` at a small size: both heads give the same loss, rlcore's step peaks lower
    (the committed figure at V = 32k is in ``bench/results/cpu-amd-epyc/trl_memory.json``)."""
    if not has_fused_head():
        pytest.skip(f"TRL {TRL} has no fused LM head (trl.trainer.utils.add_fused_lm_head), the bench's baseline")
    from bench import trl_memory

    res = trl_memory.measure(vocab=2048, hidden=32, batch=2, prompt=4, completion=60, device="cpu")
    assert res["loss_rlcore"] == pytest.approx(res["loss_trl"], rel=1e-5, abs=1e-7)
    assert res["peak_ratio_rlcore_over_trl"] < 1.0, res
