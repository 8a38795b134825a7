"""The training loop: SFT warm-up, rollouts, the fused policy update, evaluation, and bookkeeping.

Orchestration only. The losses are ``rlcore.fused_policy_loss``; advantages, anchors, A*PO's V* and OAPL's buffer
are in :mod:`rlcore.trainer.algorithms`; sampling is a :class:`~rlcore.trainer.rollout.RolloutEngine`.

One RL step:
1. Sync the sampler if it is due (every step for a separate engine, every ``oapl_lag`` steps for OAPL's lagged one).
2. Roll out ``prompts_per_step`` prompts x ``group_size`` samples (OAPL: into its buffer, then draw a batch from it)
   and score them with the reward function.
3. Recompute the batch's log-probs under the current policy (``old_logp``) and, where needed, the reference; the
   gap to the sampler's own log-probs is the training-inference mismatch, reported every step. opd and kd: the
   frozen teacher scores the batch instead of the reward (its hidden states, its head through rlcore).
4. ``epochs`` gradient steps on the fused loss. A step whose loss or gradient norm is not finite is skipped (and
   said so); the optimizer state is untouched. After ``max_skipped`` steps in a row with every update skipped, the
   run stops with a :class:`RunError` saying why (a NaN reward, say) rather than running on, learning nothing.

Bookkeeping: ``out/metrics.jsonl`` (one strict-JSON object per step: ``step``, ``reward``, the loss metrics, ...;
a non-finite value is written as ``null``; step 0 is the evaluation before RL), a progress bar and periodic lines on the terminal, ``out/checkpoint.pt`` (model, optimizer,
reference, lagged sampler, buffer, every rank's RNG, step), ``out/reward.png``, and at the end ``out/model`` (the
policy as a Hugging Face model dir: what ``teacher`` loads). Without ``teacher``, opd and kd train one first in
``out/teacher``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import dist
from .algorithms import SamplerBuffer, distill_kwargs, flat_groups, loss_kwargs, offline_vstar, state_digest
from .config import RESUME_FREE, TrainConfig, resolve_reward
from .policy import (PolicyObjective, batch_logprobs, build_model, head_weight, load_teacher, quiet_transformers,
                     teacher_scores)
from .rollout import RolloutBatch, RolloutEngine, Trajectory, TransformersEngine, collate, rollout
from .tasks import make_task

__all__ = ["Trainer", "train", "RunError"]


class RunError(RuntimeError):
    """A run that cannot go on, with the reason: a checkpoint that cannot be read or does not match the settings,
    or updates that keep being skipped. ``rlcore train`` prints it and exits 1."""


def _say(msg: str) -> None:
    if dist.is_main():
        print(msg, file=sys.stderr, flush=True)


def _policy_weights(objective_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The HF model's state dict from the objective's (which prefixes every key with ``model.``)."""
    return {k[len("model."):]: v for k, v in objective_state.items() if k.startswith("model.")}


class Trainer:
    """One run of ``cfg``. ``engine``: a :class:`RolloutEngine` to use instead of the one ``cfg.engine`` names."""

    def __init__(self, cfg: TrainConfig, engine: Optional[RolloutEngine] = None):
        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.out)
        self._resume_state = self._read_checkpoint() if cfg.resume else None   # checked before anything is built
        self.device = dist.setup()
        if self.device.type == "cpu" and cfg.cpu_threads is not None:
            torch.set_num_threads(cfg.cpu_threads)
        if dist.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
        self.task = make_task(cfg.task, seed=cfg.seed, digits=cfg.task_digits)
        self.tok = self.task.tokenizer
        self.reward_fn = resolve_reward(cfg) or self.task.reward
        self.train_pool, self.eval_prompts = self.task.splits(cfg.train_prompts, cfg.eval_prompts)
        torch.manual_seed(cfg.seed)                      # the same initial weights on every rank
        self.model = build_model(cfg, self.tok.vocab_size, pad_id=self.tok.PAD, bos_id=self.tok.BOS,
                                 eos_id=self.tok.EOS, device=self.device)
        self.sharded = dist.world() > 1 and cfg.parallel == "fsdp2"
        # an unsharded copy to sample from, taken before wrapping (a lagged sampler, or the policy under FSDP2)
        needs_copy = engine is None and (cfg.algo == "oapl" or self.sharded) and cfg.engine != "vllm"
        self._sampler_model = copy.deepcopy(self.model) if needs_copy else None
        self._eval_model = copy.deepcopy(self.model) if self.sharded else self.model
        self.objective = dist.wrap(PolicyObjective(self.model, temperature=cfg.temperature,
                                                   precision=cfg.head_precision), cfg.parallel)
        torch.manual_seed(cfg.seed + 1000 * dist.rank())  # each rank samples differently
        self.rng = random.Random(f"{cfg.seed}-{dist.rank()}")
        self.spec = cfg.spec
        self.step = 0
        self.ref: Optional[PolicyObjective] = None
        self.teacher: Optional[PolicyObjective] = None      # opd, kd: the frozen teacher (_ensure_teacher)
        if cfg.teacher is not None:
            self._ensure_teacher()                           # a teacher over another vocabulary fails here
        self.vstar: Dict[str, float] = {}
        self.buffer = SamplerBuffer(cfg.oapl_buffer) if cfg.algo == "oapl" else None
        self.sampler_state: Optional[Dict[str, torch.Tensor]] = None
        self.engine = engine if engine is not None else self._make_engine()
        self.engine_is_policy = isinstance(self.engine, TransformersEngine) and not self.engine.own_copy
        self.eval_engine = TransformersEngine(self._eval_model, pad_id=self.tok.PAD, own_copy=self.sharded)
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.history: List[Dict] = []
        self.skipped_in_a_row = 0
        self._skip_note = ""

    # ------------------------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------------------------

    def _make_engine(self) -> RolloutEngine:
        cfg = self.cfg
        kind = cfg.engine
        if kind == "auto":
            import importlib.util

            kind = "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
        if kind == "vllm":
            from .vllm_engine import VLLMEngine

            return VLLMEngine(self.model, pad_id=self.tok.PAD, workdir=self.out / "vllm", seed=cfg.seed + dist.rank())
        if self._sampler_model is not None:
            return TransformersEngine(self._sampler_model, pad_id=self.tok.PAD, own_copy=True)
        return TransformersEngine(self.model, pad_id=self.tok.PAD)

    def _new_optimizer(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.objective.parameters(), lr=lr, weight_decay=self.cfg.weight_decay)

    def _full_policy_state(self) -> Dict[str, torch.Tensor]:
        return _policy_weights(dist.full_state_dict(self.objective))

    def _sync_engine(self, engine: RolloutEngine) -> None:
        state = self._full_policy_state()
        engine.load_weights(state)
        if engine is self.engine and self.cfg.algo == "oapl":
            self.sampler_state = state

    def sft(self) -> None:
        """Supervised warm-up on the task's demonstrations: ``-mean log p`` of the policy's tokens (fused head)."""
        cfg = self.cfg
        if cfg.sft_steps == 0:
            return
        opt = self._new_optimizer(cfg.sft_lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 20))
        self.objective.train()
        t0 = time.time()
        for i in range(cfg.sft_steps):
            batch = self._demo_batch([self.rng.choice(self.train_pool) for _ in range(cfg.sft_batch)])
            logp = self.objective(batch.input_ids, batch.attention_mask, batch.loss_mask, mode="logprobs")
            loss = -(logp * batch.loss_mask).sum() / batch.loss_mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.objective.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            if (i + 1) % max(1, cfg.sft_steps // 4) == 0:
                _say(f"[sft] step {i + 1}/{cfg.sft_steps}  nll {loss.item():.3f}  ({time.time() - t0:.0f}s)")

    def _demo_batch(self, prompts: List[str]) -> RolloutBatch:
        trajs = []
        for p in prompts:
            tokens = self.tok.encode(p, bos=True)
            policy = [False] * len(tokens)
            for text, by_policy in self.task.demonstration(p):
                ids = self.tok.encode(text)
                tokens += ids
                policy += [by_policy] * len(ids)
            tokens.append(self.tok.EOS)
            policy.append(True)
            trajs.append(Trajectory(p, tokens, policy, [0.0] * len(tokens)))
        return collate(trajs, self.tok.PAD, self.device)

    def _start_rl(self) -> None:
        """After the warm-up: the frozen reference (A*PO, or a KL term), A*PO's offline V*, the teacher (opd, kd),
        the RL optimizer."""
        cfg = self.cfg
        self._ensure_teacher()
        if self.spec.anchor == "ref_logp" or cfg.beta:
            self._make_ref(self._full_policy_state())
        if cfg.algo == "apo":
            self._apo_offline()
        self.optimizer = self._new_optimizer(cfg.learning_rate)

    def _make_ref(self, state: Dict[str, torch.Tensor]) -> None:
        model = build_model(self.cfg, self.tok.vocab_size, pad_id=self.tok.PAD, bos_id=self.tok.BOS,
                            eos_id=self.tok.EOS, device=self.device)
        model.load_state_dict(state)
        model.requires_grad_(False).eval()
        self.ref = PolicyObjective(model, temperature=self.cfg.temperature, precision=self.cfg.head_precision)

    def _ensure_teacher(self) -> None:
        """opd, kd: load the teacher, from ``cfg.teacher`` or, when it is null, from ``out/teacher/model`` of a
        teacher trained first on the task (:meth:`_train_teacher`). A no-op for the other algorithms."""
        if self.spec.distill is None or self.teacher is not None:
            return
        path = self.cfg.teacher if self.cfg.teacher is not None else self._train_teacher()
        vocab = head_weight(self.model).shape[0]
        with torch.random.fork_rng(devices=self._rng_devices()):
            self.teacher = load_teacher(path, self.cfg, vocab, self.device)
        size = sum(p.numel() for p in self.teacher.model.parameters())
        _say(f"[teacher] {path}: {size / 1e6:.2f}M parameters, hidden {head_weight(self.teacher.model).shape[1]} "
             f"(the student's: {head_weight(self.model).shape[1]})")

    def _train_teacher(self) -> str:
        """``cfg.teacher_config()`` run to its end in ``out/teacher`` (resumed like any run, so a rerun reuses a
        finished teacher), on its own RNG streams: the student's run is the same whether the teacher was trained
        now or before. Returns the teacher's model dir."""
        tcfg = self.cfg.teacher_config()
        _say(f"[teacher] no teacher given: training one first ({tcfg.algo}, {tcfg.steps} steps, hidden "
             f"{tcfg.model_hidden}) in {tcfg.out}")
        with torch.random.fork_rng(devices=self._rng_devices()):
            Trainer(tcfg).run()
        return str(Path(tcfg.out) / "model")

    def _rng_devices(self) -> List:
        return [self.device] if self.device.type == "cuda" else []

    def _apo_offline(self) -> None:
        """A*PO stage 1: V* per training prompt from ``apo_samples`` samples of pi_ref (cached on disk)."""
        cfg = self.cfg
        self._sync_engine(self.engine)

        def sample_rewards(prompts, n):
            trajs = self._rollout(prompts, n, self.engine)
            return torch.tensor([t.reward for t in trajs]).view(len(prompts), n)

        key = dict(ref=state_digest(self.ref.model.state_dict()), prompts=self.train_pool, n=cfg.apo_samples,
                   beta1=cfg.beta1, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, task=cfg.task,
                   reward=cfg.reward)
        t0 = time.time()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 7)
            kept, self.vstar, stats = offline_vstar(self.train_pool, sample_rewards, samples=cfg.apo_samples,
                                                    beta1=cfg.beta1, key=key,
                                                    cache=self.out / "apo_vstar.pt" if dist.is_main() else None)
        if not kept:
            raise RuntimeError("A*PO: pi_ref solves none of the training prompts (every pass rate is 0); "
                               "warm the policy up longer (sft_steps) or use an easier task")
        self.train_pool = kept
        self.apo_stats = stats
        _say(f"[apo] offline V*: {stats['apo_kept']}/{stats['apo_prompts']} prompts kept (pass rate > 0), "
             f"pi_ref pass rate {stats['apo_ref_pass_rate']:.3f}  ({time.time() - t0:.0f}s)")

    # ------------------------------------------------------------------------------------------------------------
    # rollouts and the step
    # ------------------------------------------------------------------------------------------------------------

    def _rollout(self, prompts: List[str], n: int, engine: RolloutEngine, temperature: Optional[float] = None):
        cfg = self.cfg
        trajs = rollout(engine, self.task, prompts, n=n, max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.temperature if temperature is None else temperature)
        for t in trajs:
            t.reward = float(self.reward_fn(t.prompt, t.completion))
        return trajs

    def _max_completion(self) -> int:
        return self.cfg.max_new_tokens * self.task.max_turns

    def train_step(self) -> Dict[str, float]:
        cfg = self.cfg
        t0 = time.time()
        step = self.step + 1
        if cfg.algo == "oapl":
            if (step - 1) % cfg.oapl_lag == 0 or self.sampler_state is None:
                self._sync_engine(self.engine)
        elif not self.engine_is_policy:
            self._sync_engine(self.engine)
        prompts = [self.rng.choice(self.train_pool) for _ in range(cfg.prompts)]
        fresh = collate(self._rollout(prompts, cfg.group, self.engine), self.tok.PAD, self.device)
        t_roll = time.time() - t0
        if self.buffer is not None:
            self.buffer.add(fresh.to("cpu"))
            batch = self.buffer.draw(self.rng).to(self.device)
        else:
            batch = fresh
        self.objective.train()
        old = batch_logprobs(self.objective, batch)                                   # [B, T - 1]
        loss_mask = batch.loss_mask
        if self.spec.drop_flat_groups:
            loss_mask = loss_mask & ~flat_groups(batch.rewards, cfg.group)[:, None]
        metrics: Dict[str, float] = {}
        if self.spec.distill is not None:
            kw = self._distill_kwargs(batch, old, metrics)
        else:
            kw = self._reward_kwargs(batch, old)
        skipped = 0
        for _ in range(cfg.epochs):
            out = self.objective(batch.input_ids, batch.attention_mask, loss_mask, **dict(kw))
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.objective.parameters(), cfg.grad_clip)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            bad = dist.any_true(not (math.isfinite(out.loss.item()) and math.isfinite(norm.item())))
            if bad:
                self.optimizer.zero_grad(set_to_none=True)
                skipped += 1
                _say(f"[guard] step {step}: non-finite loss ({out.loss.item()}) or gradient norm ({norm.item()}); "
                     f"skipped the optimizer step{_reward_note(batch.rewards)}")
            else:
                self.optimizer.step()
            metrics.update({k: float(v) for k, v in out.metrics.items()})
        metrics["grad_norm"] = float(norm)
        metrics.update(self._batch_metrics(fresh, batch, old))
        metrics["time_rollout"] = t_roll
        metrics["time_step"] = time.time() - t0
        metrics = dist.all_mean(metrics)
        metrics["skipped"] = skipped
        self.step = step
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped == cfg.epochs else 0
        self._skip_note = _reward_note(batch.rewards) if skipped else ""
        return metrics

    def _reward_kwargs(self, batch: RolloutBatch, old: torch.Tensor) -> Dict:
        """The loss keywords of an algorithm that learns from the reward (``algorithms.loss_kwargs``)."""
        ref = batch_logprobs(self.ref, batch) if self.ref is not None else None
        baseline = None
        if self.cfg.algo == "apo":
            baseline = torch.tensor([self.vstar[p] for p in batch.prompts], device=self.device)
        return loss_kwargs(self.cfg, batch.rewards, old, batch.sampler_logp, ref_logp=ref, baseline=baseline,
                           max_completion=self._max_completion())

    def _distill_kwargs(self, batch: RolloutBatch, old: torch.Tensor, metrics: Dict[str, float]) -> Dict:
        """opd, kd: the teacher scores the student's samples (its backbone once, no grad), and the loss gets its head
        (``algorithms.distill_kwargs``). Adds the teacher's view to ``metrics``: ``teacher_logp_mean`` and
        ``kl_sampled``, the mean of ``log pi_S(y_t) - log pi_T(y_t)`` over the sampled tokens (an estimate of the
        reverse KL)."""
        m = batch.loss_mask
        th, tw, tlogp = teacher_scores(self.teacher, batch)
        n = m.sum().clamp(min=1)
        metrics.update(teacher_logp_mean=float(tlogp.sum() / n), kl_sampled=float((old - tlogp).sum() / n))
        return distill_kwargs(self.cfg, th, tw, tlogp, old, batch.sampler_logp)

    def _stop_if_stuck(self) -> None:
        """:class:`RunError` once ``max_skipped`` steps in a row had every update skipped."""
        if self.skipped_in_a_row >= self.cfg.max_skipped:
            raise RunError(f"the last {self.skipped_in_a_row} steps (up to step {self.step}) skipped every update: "
                           f"the loss or the gradient norm was not finite{self._skip_note}. The run stopped rather "
                           f"than go on learning nothing (max_skipped={self.cfg.max_skipped})")

    def _batch_metrics(self, fresh: RolloutBatch, batch: RolloutBatch, old: torch.Tensor) -> Dict[str, float]:
        """Reward of the fresh rollouts, completion length, and the training-inference mismatch on ``batch``."""
        m = batch.loss_mask
        gap = (old - batch.sampler_logp).abs()[m]
        return dict(reward=float(fresh.rewards.mean()), reward_std=float(fresh.rewards.std()),
                    completion_len=float(fresh.loss_mask.sum(1).float().mean()),
                    mismatch_abs_mean=float(gap.mean()) if gap.numel() else 0.0,
                    mismatch_abs_max=float(gap.max()) if gap.numel() else 0.0)

    @torch.no_grad()
    def evaluate(self, engine: Optional[RolloutEngine] = None, prefix: str = "eval") -> Dict[str, float]:
        """Mean reward on the held-out prompts: sampled at the training temperature, and greedy, as
        ``{prefix}_reward`` and ``{prefix}_greedy``. ``engine``: another model's (the teacher's), else the policy's.

        Runs on its own RNG stream, so evaluating (or not) never changes the training run."""
        if engine is None:
            engine = self.eval_engine
            if self.sharded:
                self._sync_engine(engine)
        prompts = self.eval_prompts[dist.rank()::dist.world()]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + 99991 * (self.step + 1) + dist.rank())
            sampled = self._rollout(prompts, 1, engine)
            greedy = self._rollout(prompts, 1, engine, temperature=0.0)
        return dist.all_mean({f"{prefix}_reward": sum(t.reward for t in sampled) / len(sampled),
                              f"{prefix}_greedy": sum(t.reward for t in greedy) / len(greedy)})

    def evaluate_teacher(self) -> Dict[str, float]:
        """The teacher's held-out reward, as :meth:`evaluate` measures the student's (the target of opd and kd)."""
        engine = TransformersEngine(self.teacher.model, pad_id=self.tok.PAD, own_copy=True)
        return self.evaluate(engine, prefix="teacher_eval")

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def _rank_state(self) -> Dict:
        return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                    else None, python=self.rng.getstate(), buffer=None if self.buffer is None
                    else self.buffer.state_dict())

    def save(self) -> None:
        """Everything the next step depends on, so a resumed run continues exactly as an uninterrupted one."""
        state = dict(
            step=self.step, config=self.cfg.to_dict(), model=dist.full_state_dict(self.objective),
            optimizer=dist.optim_state_dict(self.objective, self.optimizer),
            ref=None if self.ref is None else self.ref.model.state_dict(), sampler=self.sampler_state,
            vstar=self.vstar, train_pool=self.train_pool, ranks=dist.all_gather_object(self._rank_state()),
            history=self.history)
        if dist.is_main():
            tmp = self.checkpoint_path.with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, self.checkpoint_path)
        dist.barrier()

    def _read_checkpoint(self) -> Optional[Dict]:
        """The checkpoint in ``out`` (``None`` when there is none), checked against this run's settings.

        Raises :class:`RunError` naming the file when it cannot be read (empty, truncated, not a checkpoint), and
        naming the fields when the run that wrote it had other settings (``force_resume`` overrides that), or when
        it is already past ``steps``."""
        path = self.checkpoint_path
        if not path.exists():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:   # EOFError (empty), RuntimeError (truncated zip), UnpicklingError, ...
            raise RunError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).strip() or 'empty'}); "
                           "it is empty, truncated or not a checkpoint: delete it, or pass --no-resume (or another "
                           "--out) to start afresh") from None
        missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise RunError(f"checkpoint {path} is not an rlcore.trainer checkpoint (no {', '.join(missing)}); delete "
                           "it, or pass --no-resume (or another --out)")
        diff = config_differences(state["config"], self.cfg.to_dict())
        if diff and not self.cfg.force_resume:
            listed = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in diff)
            raise RunError(f"checkpoint {path} was made with other settings ({listed}). Resuming would mix two "
                           "runs: pass another --out for a new run, --no-resume to overwrite this one, or "
                           "--force-resume to continue it with the new settings")
        if state["step"] > self.cfg.steps:
            raise RunError(f"checkpoint {path} is at step {state['step']}, past steps={self.cfg.steps}: there is "
                           "nothing to train. Pass --steps above it to continue, or --no-resume to start afresh")
        return state

    def load(self) -> None:
        state = self._resume_state if self._resume_state is not None else self._read_checkpoint()
        self._resume_state = None
        if len(state["ranks"]) != dist.world():
            raise ValueError(f"{self.checkpoint_path} was written by {len(state['ranks'])} ranks; resume it with "
                             f"as many (this run has {dist.world()})")
        dist.load_full_state_dict(self.objective, state["model"])
        self.optimizer = self._new_optimizer(self.cfg.learning_rate)
        dist.load_optim_state_dict(self.objective, self.optimizer, state["optimizer"])
        if state["ref"] is not None:
            self._make_ref(state["ref"])
        self._ensure_teacher()
        self.sampler_state = state["sampler"]
        if self.sampler_state is not None:
            self.engine.load_weights(self.sampler_state)
        self.vstar, self.train_pool, self.history = state["vstar"], state["train_pool"], state["history"]
        mine = state["ranks"][dist.rank()]
        torch.set_rng_state(mine["torch"])
        if mine["cuda"] is not None:
            torch.cuda.set_rng_state_all(mine["cuda"])
        self.rng.setstate(mine["python"])
        if self.buffer is not None:
            self.buffer.load_state_dict(mine["buffer"])
        self.step = state["step"]
        _say(f"[resume] from {self.checkpoint_path} at step {self.step}")

    # ------------------------------------------------------------------------------------------------------------
    # the run
    # ------------------------------------------------------------------------------------------------------------

    def run(self) -> List[Dict]:
        """Warm up (or resume), train ``cfg.steps`` steps, and write metrics, checkpoints and the reward curve."""
        cfg = self.cfg
        _say(f"[rlcore] algo={cfg.algo} loss={self.spec.loss_type} task={cfg.task} engine="
             f"{type(self.engine).__name__} ranks={dist.world()} device={self.device} out={self.out}")
        if cfg.resume and (self._resume_state is not None or self.checkpoint_path.exists()):
            self.load()
            if self.step >= cfg.steps:
                _say(f"[resume] the checkpoint is at step {self.step} = steps: nothing left to train")
        else:
            self._ensure_teacher()
            self.sft()
            self._start_rl()
            first = dict(step=0, **self.evaluate())
            first["reward"] = first["eval_reward"]
            self.history = [first]
            if getattr(self, "apo_stats", None):
                first.update(self.apo_stats)
            if self.teacher is not None:
                first.update(self.evaluate_teacher())
        self._rewrite_metrics()
        bar = _progress(cfg, self.step)
        try:
            while self.step < cfg.steps:
                self._one_step(bar)
        finally:
            if bar is not None:
                bar.close()
        self.export_model()
        if dist.is_main():
            self._summary()
        return self.history

    @property
    def model_dir(self) -> Path:
        return self.out / "model"

    def export_model(self) -> None:
        """The policy as a Hugging Face model dir, ``out/model`` (``save_pretrained``): what ``--teacher`` and
        ``--model`` load. Rewritten at the end of every run."""
        state = self._full_policy_state()
        if dist.is_main():
            with quiet_transformers():
                self._eval_model.save_pretrained(self.model_dir, state_dict=state)
        dist.barrier()

    def _one_step(self, bar) -> None:
        """A training step with its evaluation, metrics line, progress, stop check and checkpoint."""
        cfg = self.cfg
        metrics = self.train_step()
        if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
            metrics.update(self.evaluate())
        record = dict(step=self.step, **metrics)
        self.history.append(record)
        self._append_metrics(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", loss=f"{metrics['loss']:.3g}")
        if self.step % cfg.log_every == 0 or self.step == cfg.steps:
            _say(_line(record, cfg.steps))
        self._stop_if_stuck()
        if self.step % cfg.save_every == 0 or self.step == cfg.steps:
            self.save()

    def _rewrite_metrics(self) -> None:
        """``metrics.jsonl`` = the history so far (a resumed run drops the lines of steps after its checkpoint)."""
        if dist.is_main():
            with open(self.out / "metrics.jsonl", "w") as f:
                for record in self.history:
                    f.write(_json_line(record))

    def _append_metrics(self, record: Dict) -> None:
        if dist.is_main():
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(_json_line(record))

    def _summary(self) -> None:
        evals = [r for r in self.history if "eval_reward" in r]
        if len(evals) >= 2:
            a, b = evals[0], evals[-1]
            _say(f"[rlcore] held-out reward (sampled, T={self.cfg.temperature}): {a['eval_reward']:.3f} at step "
                 f"{a['step']} -> {b['eval_reward']:.3f} at step {b['step']}; greedy {a['eval_greedy']:.3f} -> "
                 f"{b['eval_greedy']:.3f}")
            if "teacher_eval_reward" in a:
                _say(f"[rlcore] the teacher's held-out reward: {a['teacher_eval_reward']:.3f} (greedy "
                     f"{a['teacher_eval_greedy']:.3f})")
        if self.cfg.plot:
            from .plot import plot_rewards

            path = plot_rewards(self.history, self.out / "reward.png", title=self._plot_title())
            _say(f"[rlcore] reward curve: {path}" if path else
                 "[rlcore] matplotlib is not installed: no reward.png (pip install matplotlib)")

    def _plot_title(self) -> str:
        title = f"{self.cfg.algo} on {self.cfg.task}"
        if self.teacher is None:
            return title
        return (f"{title}: a student of hidden {head_weight(self.model).shape[1]} from a teacher of hidden "
                f"{head_weight(self.teacher.model).shape[1]}")


_CHECKPOINT_KEYS = ("step", "config", "model", "optimizer", "ranks")


def config_differences(saved: Dict, current: Dict) -> List[tuple]:
    """``[(field, saved value, current value)]`` for the fields that change what a resumed run computes (every
    field but ``config.RESUME_FREE``). A field the checkpoint lacks (an older rlcore) counts as its default."""
    from .config import _DEFAULTS

    return [(k, saved.get(k, _DEFAULTS.get(k)), v) for k, v in current.items()
            if k not in RESUME_FREE and saved.get(k, _DEFAULTS.get(k)) != v]


def _reward_note(rewards: torch.Tensor) -> str:
    """``"; the reward was NaN for 12 of 32 samples"`` when some rewards are not finite, else ``""``."""
    bad = ~torch.isfinite(rewards)
    if not bool(bad.any()):
        return ""
    kinds = ", ".join(sorted({str(float(x)) for x in rewards[bad].tolist()}))
    return f"; the reward function returned {kinds} for {int(bad.sum())} of {rewards.numel()} samples"


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _json_line(record: Dict) -> str:
    """One line of strict JSON (``NaN`` and ``inf`` become ``null``, which every JSON reader accepts)."""
    return json.dumps(_finite_or_none(record), allow_nan=False) + "\n"


def _progress(cfg: TrainConfig, start: int):
    if not (cfg.progress and dist.is_main()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.steps, initial=start, desc=f"rl {cfg.algo}", leave=False, dynamic_ncols=True)


def _line(r: Dict, steps: int) -> str:
    parts = [f"step {r['step']}/{steps}", f"reward {r['reward']:.3f}", f"loss {r['loss']:.4g}"]
    if "eval_reward" in r:
        parts.append(f"eval {r['eval_reward']:.3f} (greedy {r['eval_greedy']:.3f})")
    if "kl_sampled" in r:                                    # opd, kd: how far the student is from the teacher
        parts.append(f"kl to teacher {r['kl_sampled']:.3f}")
    parts += [f"mismatch {r['mismatch_abs_max']:.1e}", f"{r['time_step']:.2f}s/step"]
    if r.get("skipped"):
        parts.append("SKIPPED")
    return "[rl] " + "  ".join(parts)


def train(cfg: TrainConfig, engine: Optional[RolloutEngine] = None) -> List[Dict]:
    """Run ``cfg`` to the end; returns the metrics history (also in ``cfg.out/metrics.jsonl``)."""
    trainer = Trainer(cfg, engine)
    try:
        return trainer.run()
    finally:
        dist.teardown()
