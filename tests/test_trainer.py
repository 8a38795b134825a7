"""rlcore.trainer: the fused policy update against the model's own logits, the sampler's log-probs against a
teacher-forced pass, masked tool tokens, resume, the non-finite guard, bad configs, the CLI and torchrun (gloo).

Every run is a tiny random Llama (hidden 64, 2 layers, vocabulary 19) for a handful of steps: seconds on a CPU.
"""

import copy
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import rlcore  # noqa: E402
from rlcore.trainer import ALGORITHMS, TASKS, Task, TrainConfig, Trainer, load_config  # noqa: E402
from rlcore.trainer.algorithms import loss_kwargs  # noqa: E402
from rlcore.divergence import linear_divergence_reference  # noqa: E402
from rlcore.trainer.policy import batch_logprobs, head_weight, hidden_states  # noqa: E402
from rlcore.trainer.rollout import RolloutEngine, Sample, TransformersEngine, collate, rollout  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def tiny(tmp_path, **kw) -> TrainConfig:
    """A config that builds in a second: no SFT unless asked, few prompts, no plot or progress bar."""
    base = dict(out=str(tmp_path / "run"), sft_steps=0, steps=2, prompts_per_step=4, train_prompts=64,
                eval_prompts=8, eval_every=1, save_every=100, plot=False, progress=False, engine="transformers")
    base.update(kw)
    return TrainConfig(**base)


def nan_reward(prompt: str, completion: str) -> float:
    return float("nan")


def length_reward(prompt: str, completion: str) -> float:
    """A reward that varies within every group of an untrained model (whose answers are mostly wrong)."""
    return len(completion) / 6.0


# ----------------------------------------------------------------------------------------------------------------------
# the update: fused head == the model's own logits
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["grpo", "gspo", "cispo", "apo", "kimi", "rebel"])
def test_fused_step_equals_the_models_logits(tmp_path, algo):
    """One step's loss and every parameter's gradient, via hidden states + LM-head weight into fused_policy_loss,
    equal policy_loss on log_softmax of the model's own forward logits (the materialised composition)."""
    cfg = tiny(tmp_path, algo=algo, sft_steps=20, temperature=0.8, reward="tests.test_trainer:length_reward")
    tr = Trainer(cfg)
    tr.sft()
    tr._start_rl()
    trajs = tr._rollout(tr.train_pool[:cfg.prompts], cfg.group, tr.engine)
    batch = collate(trajs, tr.tok.PAD)
    old = batch_logprobs(tr.objective, batch)
    ref = batch_logprobs(tr.ref, batch) if tr.ref is not None else None
    baseline = torch.tensor([tr.vstar[p] for p in batch.prompts]) if algo == "apo" else None
    kw = loss_kwargs(cfg, batch.rewards, old, batch.sampler_logp, ref_logp=ref, baseline=baseline,
                     max_completion=cfg.max_new_tokens)
    params = [p for p in tr.model.parameters()]

    out = tr.objective(batch.input_ids, batch.attention_mask, batch.loss_mask, **dict(kw))
    fused = torch.autograd.grad(out.loss, params)

    logits = tr.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logp = torch.log_softmax(logits.float() / cfg.temperature, dim=-1)
    logp = logp.gather(-1, batch.targets[..., None])[..., 0]                           # [B, T - 1]
    kw_ref = dict(kw)
    advantages = kw_ref.pop("advantages")
    ref_out = rlcore.policy_loss(logp, advantages, batch.loss_mask, **kw_ref)
    plain = torch.autograd.grad(ref_out.loss, params)

    assert batch.loss_mask.any() and math.isfinite(out.loss.item())
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-5, atol=1e-6)
    for (name, _), g, r in zip(tr.model.named_parameters(), fused, plain):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert any(g.abs().max() > 0 for g in fused)


# ----------------------------------------------------------------------------------------------------------------------
# rollouts
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_transformers_sampler_logprobs_equal_teacher_forced(tmp_path, temperature):
    """generate's sampler log-probs (left-padded prompts of several lengths) equal a teacher-forced forward of the
    same model: through rlcore's fp32 head, and through the model's own logits."""
    tr = Trainer(tiny(tmp_path, temperature=temperature))
    prompts = ["7+1=", "45+9=", "3+3=", "99+9="]                    # 4, 5 and 6 characters: left padding differs
    trajs = rollout(tr.engine, tr.task, prompts, n=3, max_new_tokens=6, temperature=temperature)
    batch = collate(trajs, tr.tok.PAD)
    assert batch.loss_mask.sum() >= 12
    mine = batch_logprobs(tr.objective, batch)
    logits = tr.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    theirs = torch.log_softmax(logits / temperature, -1).gather(-1, batch.targets[..., None])[..., 0]
    m = batch.loss_mask
    torch.testing.assert_close(batch.sampler_logp[m], mine[m], rtol=0, atol=2e-5)
    torch.testing.assert_close(batch.sampler_logp[m], theirs[m], rtol=0, atol=2e-5)


class ScriptedEngine(RolloutEngine):
    """Replays the task's demonstration turn by turn (with made-up sampler log-probs): a policy that calls the
    calculator, so the multi-turn path is exercised without training one."""

    def __init__(self, task):
        self.task = task

    def generate(self, prompts, *, max_new_tokens, temperature, stop_ids):
        tok, out = self.task.tokenizer, []
        for ids in prompts:
            text = tok.decode(ids)
            prompt = text[:text.index("=") + 1]
            done = text[len(prompt):]
            policy_text = ""
            for seg, by_policy in self.task.demonstration(prompt):
                if done.startswith(seg):
                    done = done[len(seg):]
                elif by_policy:
                    policy_text = seg
                    break
            tokens = tok.encode(policy_text) + ([] if policy_text.endswith("]") else [tok.EOS])
            out.append(Sample(tokens, [-0.5] * len(tokens)))
        return out

    def load_weights(self, state_dict):
        pass


def test_multi_turn_tool_tokens_are_masked_and_get_no_gradient(tmp_path):
    """The calculator environment's observation tokens are not loss tokens, and the hidden states that predict them
    receive exactly zero gradient, whatever garbage sits in their per-token inputs."""
    cfg = tiny(tmp_path, task="calc", algo="grpo", group_size=2)
    tr = Trainer(cfg)
    trajs = tr._rollout(["23*4=", "7*8="], 2, ScriptedEngine(tr.task))
    assert [t.completion for t in trajs[::2]] == ["[23*4]92|92", "[7*8]56|56"]
    assert [t.reward for t in trajs] == [1.0] * 4
    assert all(t.turns == 2 for t in trajs)
    batch = collate(trajs, tr.tok.PAD)
    obs = torch.zeros_like(batch.loss_mask)
    for i, t in enumerate(trajs):
        text_ids = t.tokens
        start = text_ids.index(tr.tok.encode("]")[0]) + 1          # the observation follows the tool call
        end = start + len(tr.tok.encode("92|" if i < 2 else "56|"))
        obs[i, start - 1:end - 1] = True                             # targets are shifted by one
    assert obs.any() and not (batch.loss_mask & obs).any()
    assert batch.loss_mask.sum(1).tolist() == [len("[23*4]92") + 1] * 2 + [len("[7*8]56") + 1] * 2

    h = hidden_states(tr.model, batch.input_ids, batch.attention_mask)[:, :-1].detach().requires_grad_(True)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    old = torch.where(obs, float("nan"), batch_logprobs(tr.objective, batch))       # garbage where masked
    adv = rewards - rewards.view(-1, 2).mean(1).repeat_interleave(2)
    out = rlcore.fused_policy_loss(h, head_weight(tr.model), batch.targets, adv, batch.loss_mask, old_logp=old,
                                   loss_type="gspo")
    out.loss.backward()
    g = h.grad.abs().sum(-1)                                                           # [B, T - 1]
    assert torch.isfinite(out.loss) and (g[obs] == 0).all()
    assert (g[batch.loss_mask] > 0).all()


# ----------------------------------------------------------------------------------------------------------------------
# bookkeeping
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["oapl", "apo", "opd"])
def test_resume_reproduces_the_next_step(tmp_path, algo, request):
    """A run stopped at a checkpoint and resumed takes the same next step as an uninterrupted one: metrics
    (rollout rewards, loss, gradient norm) and final weights. oapl: the lagged sampler and its buffer; apo: the
    reference, V* and the filtered prompts; opd: the teacher, reloaded from --teacher."""
    common = dict(algo=algo, sft_steps=10, oapl_lag=2, oapl_buffer=3, save_every=2, eval_every=2,
                  group_size=1 if algo == "apo" else 4)
    if algo == "opd":
        common["teacher"] = request.getfixturevalue("teacher_dir")
    full = Trainer(tiny(tmp_path / "full", steps=4, **common))
    whole = full.run()
    first = Trainer(tiny(tmp_path / "parts", steps=2, **common))
    first.run()
    second = Trainer(tiny(tmp_path / "parts", steps=4, **common))
    resumed = second.run()
    assert second.step == 4 and [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
    drop = {"time_rollout", "time_step"}
    for a, b in zip(whole[3:], resumed[3:]):
        assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}
    for (name, p), q in zip(full.model.named_parameters(), second.model.parameters()):
        assert torch.equal(p, q), name
    lines = (tmp_path / "parts" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1, 2, 3, 4]


def test_non_finite_loss_skips_the_step(tmp_path, capsys):
    cfg = tiny(tmp_path, algo="grpo", reward="tests.test_trainer:nan_reward", steps=1)
    tr = Trainer(cfg)
    tr._start_rl()
    before = [p.detach().clone() for p in tr.model.parameters()]
    metrics = tr.train_step()
    assert metrics["skipped"] == 1
    assert all(torch.equal(p, q) for p, q in zip(before, tr.model.parameters()))
    assert "[guard] step 1: non-finite loss" in capsys.readouterr().err


class _NoReward(Task):
    def sample_prompt(self, rng):
        return "1+1="


@pytest.mark.parametrize("kw, match", [
    (dict(algo="ppo2"), "algo must be one of 'grpo', .*, got 'ppo2'"),
    (dict(algo="gspo", group_size=1), r"group_size must be >= 2, got 1 \(algo 'gspo' compares the samples"),
    (dict(algo="oapl", group_size=1), "group_size must be >= 2"),
    (dict(algo="rebel", group_size=3), "group_size must be even, got 3 .*pairs"),
    (dict(algo="apo", group_size=4), "group_size must be 1, got 4 .*algo 'apo' samples one completion per prompt"),
    (dict(reward="tests.test_trainer:no_such_fn"), "reward must be .*, got 'tests.test_trainer:no_such_fn' .*cannot "
                                                   "be loaded"),
    (dict(reward="len"), "reward must be 'module:function'"),
    (dict(task="noreward"), "task 'noreward' defines no reward"),
    (dict(is_mode="token_truncate", algo="apo"), "is_mode must be null.*corrects the clipped family"),
    (dict(engine="sglang"), "engine must be one of 'auto', 'transformers', 'vllm', got 'sglang'"),
    (dict(algo="grpo", teacher="runs/t/model"), r"teacher must be null, got 'runs/t/model' \(algo 'grpo' learns from "
                                                r"the reward; only 'opd' and 'kd' distil from a teacher\)"),
    (dict(algo="opd", teacher="/no/such/dir"), r"teacher must be a model directory .*, got '/no/such/dir' \(no such "
                                               "directory"),
    (dict(algo="kd", teacher="tests"), r"teacher must be a model directory .*\(it holds no config.json\)"),
    (dict(algo="opd", opd_baseline="topk"), r"top_k must be an integer >= 1, got None \(opd_baseline 'topk'"),
    (dict(algo="opd", opd_baseline="mean"), "opd_baseline must be one of 'none', 'full', 'topk', got 'mean'"),
    (dict(algo="opd", top_k=3), r"top_k must be null, got 3 \(opd_baseline is 'full'"),
    (dict(algo="kd", top_k=0), "top_k must be an integer >= 1, or null .*, got 0"),
    (dict(algo="kd", kd_kind="l2"), "kd_kind must be one of 'reverse_kl', 'forward_kl', 'jsd', got 'l2'"),
    (dict(algo="kd", jsd_beta="1.0"), "jsd_beta must be a finite number > 0 and < 1, got 1.0"),
    (dict(algo="opd", beta=0.1), r"beta must be 0, got 0.1 \(algo 'opd' is anchored at the teacher"),
    (dict(algo="opd", teacher_algo="kd"), "teacher_algo must be one of 'grpo', .*'rebel', got 'kd'"),
    (dict(algo="opd", teacher_hidden=65), "teacher_hidden must be a multiple of teacher_heads = 2, got 65"),
])
def test_bad_configs_fail_at_start_up(monkeypatch, kw, match):
    monkeypatch.setitem(TASKS, "noreward", _NoReward)
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_config_files_and_unknown_fields(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(dict(algo="cispo", steps=7)))
    cfg = load_config(str(path), steps=9)
    assert (cfg.algo, cfg.steps) == ("cispo", 9)
    path.write_text(json.dumps(dict(algo="cispo", stpes=7)))
    with pytest.raises(ValueError, match="unknown config field.*'stpes'"):
        load_config(str(path))
    pytest.importorskip("yaml")
    ypath = tmp_path / "c.yaml"
    ypath.write_text("algo: apo\ngroup_size: 1\nlr: 1.0e-4\n")
    assert load_config(str(ypath)).learning_rate == 1e-4


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def test_cli_bad_config_exits_2_with_the_reason():
    proc = subprocess.run([sys.executable, "-m", "rlcore", "train", "--algo", "gspo", "--group-size", "1"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "bad config: --group-size must be >= 2, got 1 (algo 'gspo' compares the samples" in proc.stderr


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_torchrun_two_gloo_ranks(tmp_path, parallel):
    """Two CPU ranks (gloo) under torchrun: SFT, RL steps, a checkpoint, metrics from rank 0."""
    out = tmp_path / "run"
    with socket.socket() as sock:                                    # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "-m", "rlcore", "train", "--algo", "gspo", "--out", str(out), "--steps", "3", "--sft-steps", "3",
           "--prompts-per-step", "2", "--group-size", "4", "--train-prompts", "32", "--eval-prompts", "8",
           "--eval-every", "3", "--save-every", "2", "--no-plot", "--no-progress", "--engine", "transformers",
           "--parallel", parallel]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ranks=2" in proc.stderr
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert all(math.isfinite(r["reward"]) and math.isfinite(r["loss"]) for r in records[1:])
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 3


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_every_algorithm_trains_end_to_end(tmp_path, algo, request):
    """Each algorithm runs SFT, its set-up (A*PO's offline V*, OAPL's lagged sampler, the teacher of opd and kd)
    and RL steps with finite metrics; the clipped ones (opd's REINFORCE too) also with the sampler-log-prob
    correction."""
    extra = dict(is_mode="token_truncate") if ALGORITHMS[algo].family == "clipped" else {}
    if ALGORITHMS[algo].distill is not None:
        extra["teacher"] = request.getfixturevalue("teacher_dir")
    cfg = tiny(tmp_path, algo=algo, sft_steps=10, steps=2, eval_every=2, group_size=None, prompts_per_step=4,
               reward="tests.test_trainer:length_reward", **extra)
    history = Trainer(cfg).run()
    assert [r["step"] for r in history] == [0, 1, 2]
    for r in history[1:]:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
        assert r["skipped"] == 0
    # the sampler is the policy (to fp32 rounding) wherever it was synced at the step's start; OAPL's lags behind
    assert history[1]["mismatch_abs_max"] < 1e-4
    assert (history[2]["mismatch_abs_max"] > 1e-3) == (algo == "oapl")
    if ALGORITHMS[algo].family == "clipped":
        assert "is_weight_mean" in history[1]
    assert (tmp_path / "run" / "checkpoint.pt").exists()


def test_calculator_task_runs_multi_turn(tmp_path):
    """The calc task end to end with the transformers engine: after a short SFT the policy calls the tool, so
    trajectories have two turns and observation tokens, which are not loss tokens."""
    cfg = tiny(tmp_path, task="calc", algo="grpo", sft_steps=150, steps=1, group_size=2, max_new_tokens=8)
    tr = Trainer(cfg)
    tr.sft()
    tr._start_rl()
    trajs = tr._rollout(tr.train_pool[:8], 2, tr.engine)
    multi = [t for t in trajs if t.turns == 2]
    assert multi, [t.completion for t in trajs]
    for t in multi:
        assert not all(t.policy[len(tr.tok.encode(t.prompt, bos=True)):])      # the observation is not the policy's
    assert tr.train_step()["skipped"] == 0


# ----------------------------------------------------------------------------------------------------------------------
# distillation: opd and kd with a teacher
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny Llama over the task's vocabulary with another hidden size (96, 3 heads) than the student's, given a
    short SFT (so it is peaked where a random student is flat), saved as ``out/model`` by the trainer's own export:
    what ``--teacher`` loads."""
    tr = Trainer(tiny(tmp_path_factory.mktemp("teacher"), seed=5, model_hidden=96, model_heads=3, sft_steps=30))
    tr.sft()
    tr.export_model()
    return str(tr.model_dir)


def _float64_view(model, batch, temperature):
    """A float64 copy of ``model``: its hidden states ``[B, T - 1, H]``, head ``[V, H]`` and, from its own forward
    (the logits materialised), the log-probs of the batch's targets ``[B, T - 1]``."""
    m64 = copy.deepcopy(model).double()
    logits = m64(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logp = torch.log_softmax(logits / temperature, dim=-1).gather(-1, batch.targets[..., None])[..., 0]
    h = hidden_states(m64, batch.input_ids, batch.attention_mask)[:, :-1]
    return m64, h, head_weight(m64), logp


@pytest.mark.parametrize("algo, extra", [
    ("opd", dict(opd_baseline="full")), ("opd", dict(opd_baseline="topk", top_k=3)), ("opd", dict(opd_baseline="none")),
    ("kd", dict(kd_kind="reverse_kl")), ("kd", dict(kd_kind="forward_kl")), ("kd", dict(kd_kind="jsd", jsd_beta=0.3)),
    ("kd", dict(kd_kind="reverse_kl", top_k=4)),
])
def test_distillation_step_equals_a_float64_reference(tmp_path, teacher_dir, algo, extra):
    """One opd/kd step's loss and every student gradient (hidden states of both backbones into rlcore's heads and
    linear_divergence, fp32) equal the objective computed in float64 from both models' own materialised logits:
    opd ``-mean_t sg(l_T - l_S - b_t) l_S`` with ``b_t = -KL(p_S || p_T)`` (full, top-k renormalised, or 0);
    kd ``mean_t D(p_S, p_T)`` over the sampled tokens."""
    cfg = tiny(tmp_path, algo=algo, teacher=teacher_dir, sft_steps=5, temperature=0.8, prompts_per_step=3,
               group_size=2, **extra)
    tr = Trainer(cfg)
    tr.sft()
    tr._start_rl()
    batch = collate(tr._rollout(tr.train_pool[:3], 2, tr.engine), tr.tok.PAD)
    m = batch.loss_mask
    old = batch_logprobs(tr.objective, batch)
    out = tr.objective(batch.input_ids, batch.attention_mask, m, **tr._distill_kwargs(batch, old, {}))
    params = list(tr.model.parameters())
    fused = torch.autograd.grad(out.loss, params)

    student, hs, ws, ls = _float64_view(tr.model, batch, cfg.temperature)
    ht, wt, lt = (x.detach() for x in _float64_view(tr.teacher.model, batch, cfg.temperature)[1:])

    def divergence(kind, top_k):                   # both [B, T - 1, V] logit tensors, in float64
        return linear_divergence_reference(hs, ws, ht, wt, kind=kind, beta=cfg.jsd_beta, top_k=top_k,
                                           temperature=cfg.temperature, softmax_dtype=torch.float64)

    if algo == "opd":
        kl = {"full": lambda: divergence("reverse_kl", None), "topk": lambda: divergence("reverse_kl", cfg.top_k),
              "none": lambda: torch.zeros_like(lt)}[cfg.opd_baseline]()
        per_token = -(lt - ls + kl).detach() * ls
    else:
        per_token = divergence(cfg.kd_kind, cfg.top_k)
    want = torch.where(m, per_token, 0.0).sum() / m.sum()
    plain = torch.autograd.grad(want, list(student.parameters()))

    assert m.sum() >= 6 and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)
    for (name, _), g, r in zip(tr.model.named_parameters(), fused, plain):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6, msg=lambda s: f"{name}: {s}")
    assert any(g.abs().max() > 1e-4 for g in fused)                   # the teacher is far from the student


@pytest.mark.parametrize("algo, extra", [("opd", {}), ("kd", dict(kd_kind="jsd"))])
def test_distillation_trains_end_to_end_from_a_config_file(tmp_path, teacher_dir, algo, extra):
    """opd/kd from a JSON config: the teacher is loaded from --teacher as saved (its weights, frozen, never
    updated), its held-out reward is the step-0 target, the student's reverse KL to it (exact, over the vocabulary,
    on a fixed batch of demonstrations) falls, out/model is written."""
    from transformers import AutoModelForCausalLM

    def kl_to_teacher(batch):
        with torch.no_grad():
            hs, ht = (hidden_states(m, batch.input_ids, batch.attention_mask)[:, :-1] for m in (tr.model, teacher))
            kl = rlcore.linear_divergence(hs, head_weight(tr.model), ht, head_weight(teacher), mask=batch.loss_mask)
        return float(kl[batch.loss_mask].mean())

    path = tmp_path / "c.json"
    path.write_text(json.dumps(dict(algo=algo, teacher=teacher_dir, out=str(tmp_path / "run"), sft_steps=0,
                                    steps=4, prompts_per_step=4, group_size=2, lr=3e-3, train_prompts=64,
                                    eval_prompts=8, eval_every=2, plot=False, progress=False, **extra)))
    cfg = load_config(str(path))
    tr = Trainer(cfg)
    saved = AutoModelForCausalLM.from_pretrained(teacher_dir).state_dict()
    teacher = tr.teacher.model
    fixed = tr._demo_batch(tr.eval_prompts[:8])
    before = kl_to_teacher(fixed)
    history = tr.run()
    assert [r["step"] for r in history] == [0, 1, 2, 3, 4]
    assert {"teacher_eval_reward", "teacher_eval_greedy"} <= set(history[0])
    for r in history[1:]:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
        assert r["skipped"] == 0 and r["grad_norm"] > 0
    assert kl_to_teacher(fixed) < 0.95 * before
    got = tr.teacher.model.state_dict()
    assert set(got) == set(saved) and all(torch.equal(got[k], saved[k]) for k in saved)
    assert not any(p.requires_grad for p in tr.teacher.model.parameters())
    assert (tmp_path / "run" / "model" / "config.json").exists()


def test_teacher_over_another_vocabulary_is_refused(tmp_path):
    """A teacher whose head is not over the student's vocabulary stops the run at construction, in the CLI with
    exit status 2 and the field; so does a top_k above the vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    bad = tmp_path / "bad"
    LlamaForCausalLM(LlamaConfig(vocab_size=25, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=1, num_key_value_heads=1)).save_pretrained(bad)
    with pytest.raises(ValueError, match=r"teacher must be a model over the student's vocabulary of 19 tokens, got "
                                         r"'.*bad' \(its LM head has 25 rows"):
        Trainer(tiny(tmp_path, algo="opd", teacher=str(bad)))
    proc = subprocess.run([sys.executable, "-m", "rlcore", "train", "--algo", "kd", "--teacher", str(bad), "--out",
                           str(tmp_path / "cli"), "--sft-steps", "0", "--steps", "1", "--no-progress"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "rlcore train: bad config: --teacher must be a model over the student's vocabulary of 19" in proc.stderr
    assert "Traceback" not in proc.stderr
    good = Trainer(tiny(tmp_path / "g"))
    good.export_model()
    with pytest.raises(ValueError, match="top_k must be at most the vocabulary size, 19, got 20"):
        Trainer(tiny(tmp_path, algo="kd", teacher=str(good.model_dir), top_k=20))


def test_a_teacher_is_trained_first_without_teacher(tmp_path, capsys):
    """No --teacher: a teacher run (teacher_algo, teacher_steps, the teacher's architecture) goes first in
    out/teacher, then the student distils from out/teacher/model. The student's run is the same as one given that
    teacher by path (the teacher's training does not move the student's RNG), and a rerun reuses the teacher."""
    common = dict(algo="opd", sft_steps=3, steps=2, teacher_steps=2, teacher_hidden=32, teacher_heads=1,
                  teacher_algo="gspo", group_size=2)
    first = Trainer(tiny(tmp_path / "a", **common))
    hist = first.run()
    teacher = tmp_path / "a" / "run" / "teacher"
    lines = [json.loads(x) for x in (teacher / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2] and "[teacher] no teacher given: training one first" in \
        capsys.readouterr().err
    assert first.teacher.model.config.hidden_size == 32 and first.model.config.hidden_size == 64
    given = Trainer(tiny(tmp_path / "b", teacher=str(teacher / "model"), **common)).run()
    drop = {"time_rollout", "time_step"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in hist] == \
        [{k: v for k, v in r.items() if k not in drop} for r in given]
    stamp = (teacher / "checkpoint.pt").stat().st_mtime_ns
    Trainer(tiny(tmp_path / "a", **dict(common, steps=3))).run()             # resumes the student; reuses the teacher
    assert "the checkpoint is at step 2 = steps: nothing left to train" in capsys.readouterr().err
    assert (teacher / "checkpoint.pt").stat().st_mtime_ns == stamp
