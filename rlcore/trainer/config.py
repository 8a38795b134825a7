"""``TrainConfig``: every knob of a run in one dataclass, checked at start-up, loadable from YAML or JSON.

Validation happens before any model is built, so a bad config (an unknown algorithm, a group of one for a group
method, a task with no reward) fails in the first second with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from .algorithms import ALGORITHMS

__all__ = ["TrainConfig", "load_config", "resolve_reward", "QUICK"]

ENGINES = ("auto", "transformers", "vllm")
PARALLEL = ("ddp", "fsdp2")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@dataclass
class TrainConfig:
    """One RL run. Defaults are the demo: the ``add`` task, a tiny random Llama, SFT warm-up, then RL.

    ``None`` for ``group_size``, ``prompts_per_step``, ``lr``, ``beta2``, ``eps_low``, ``eps_high`` means the algorithm's default
    (``rlcore.trainer.algorithms.ALGORITHMS``).
    """

    algo: str = "grpo"
    out: str = "runs/rlcore"
    seed: int = 0
    # ---- task and reward
    task: str = "add"
    task_digits: int = 2
    reward: Optional[str] = None          # "module:function" (a callable (prompt, completion) -> float); None: the task's
    train_prompts: int = 768
    eval_prompts: int = 128
    # ---- policy
    model: Optional[str] = None           # a local path for AutoModelForCausalLM; None: a tiny random Llama
    model_hidden: int = 64
    model_layers: int = 2
    model_heads: int = 2                  # head_dim 32: vLLM's CPU attention takes 32, 64, 80, ...
    dtype: str = "float32"
    cpu_threads: Optional[int] = 1        # torch threads per process on CPU (None: torch's default). A tiny model
    #                                       gains nothing from intra-op threads, and on a busy machine they spin
    head_precision: str = "fp32"          # rlcore.linear_logprobs precision of the LM head (the FP32 head)
    # ---- SFT warm-up (the default task starts from a random model)
    sft_steps: int = 200
    sft_batch: int = 64
    sft_lr: float = 3e-3
    # ---- rollouts
    engine: str = "auto"                  # vllm when importable and asked for; auto = transformers
    prompts_per_step: Optional[int] = None
    group_size: Optional[int] = None
    max_new_tokens: int = 6
    temperature: float = 1.0
    # ---- optimisation
    steps: int = 300
    lr: Optional[float] = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    epochs: int = 1                       # gradient steps per rollout batch (>1: the ratios leave 1, clipping acts)
    # ---- loss knobs (None: the loss type's preset)
    eps_low: Optional[float] = None
    eps_high: Optional[float] = None
    beta: float = 0.0                     # KL to the reference (clipped family)
    beta1: float = 0.5                    # V* temperature (apo, oapl)
    beta2: Optional[float] = None         # regression family
    eta: float = 1.0                      # rebel
    is_mode: Optional[str] = None         # training-inference correction from the sampler's log-probs
    is_cap: float = 2.0
    entropy_coef: float = 0.0
    # ---- algorithm-specific
    apo_samples: int = 8                  # A*PO offline stage: samples per prompt from pi_ref
    oapl_lag: int = 4                     # OAPL: the sampler is synced to the policy every oapl_lag steps
    oapl_buffer: int = 4                  # OAPL: rollout batches kept; each step trains on one drawn from them
    # ---- bookkeeping
    eval_every: int = 25
    log_every: int = 25
    save_every: int = 50
    resume: bool = True                   # continue from out/checkpoint.pt when it exists
    plot: bool = True
    progress: bool = True
    parallel: str = "ddp"                 # under torchrun: ddp or fsdp2
    quick: bool = False                   # the shortened demo (see QUICK)

    def __post_init__(self):
        if self.quick:
            for key, value in QUICK.items():
                setattr(self, key, value)
        self.validate()

    # ------------------------------------------------------------------------------------------------------------
    @property
    def spec(self):
        return ALGORITHMS[self.algo]

    @property
    def group(self) -> int:
        return self.spec.group_size if self.group_size is None else self.group_size

    @property
    def prompts(self) -> int:
        return self.spec.prompts if self.prompts_per_step is None else self.prompts_per_step

    @property
    def learning_rate(self) -> float:
        return self.spec.lr if self.lr is None else self.lr

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if self.algo not in ALGORITHMS:
            raise ValueError(f"unknown algo {self.algo!r}; expected one of {', '.join(map(repr, ALGORITHMS))}")
        spec = self.spec
        g = self.group
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"group_size must be a positive int, got {g!r}")
        if spec.grouped and g < 2:
            raise ValueError(f"algo {self.algo!r} compares the samples of a prompt with each other: group_size must "
                             f"be >= 2, got {g}")
        if self.algo == "rebel" and g % 2:
            raise ValueError(f"algo 'rebel' trains on pairs of samples of a prompt: group_size must be even, got {g}")
        if self.algo == "apo" and g != 1:
            raise ValueError(f"algo 'apo' samples one completion per prompt online (V* replaces the group): "
                             f"group_size must be 1, got {g}")
        for name in ("steps", "prompts", "max_new_tokens", "epochs", "sft_batch", "train_prompts",
                     "eval_prompts", "apo_samples", "oapl_lag", "oapl_buffer", "eval_every", "log_every",
                     "save_every", "model_hidden", "model_layers", "model_heads", "task_digits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.sft_steps < 0:
            raise ValueError(f"sft_steps must be >= 0, got {self.sft_steps!r}")
        for name in ("temperature", "beta1", "eta", "is_cap", "grad_clip", "sft_lr", "learning_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; expected one of {', '.join(map(repr, ENGINES))}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"unknown parallel {self.parallel!r}; expected one of {', '.join(map(repr, PARALLEL))}")
        if self.is_mode is not None:
            if self.is_mode not in IS_MODES:
                raise ValueError(f"unknown is_mode {self.is_mode!r}; expected one of {', '.join(map(repr, IS_MODES))}")
            if spec.family == "regression":
                raise ValueError(f"is_mode corrects the clipped family's ratios; algo {self.algo!r} is a regression "
                                 "loss (its anchor already is a fixed policy)")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {self.dtype!r}")
        from .tasks import TASKS

        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {', '.join(map(repr, TASKS))}")
        resolve_reward(self)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# The demo shortened to a few minutes on a 2-core CPU (rlcore train --quick).
QUICK: Dict[str, Any] = dict(steps=120, eval_every=20, log_every=20, save_every=60)


def resolve_reward(cfg: TrainConfig):
    """The reward callable: ``cfg.reward`` (``"module:function"``) if given, else the task's own ``reward``.

    Raises ``ValueError`` when there is none, so a run never starts without a reward.
    """
    if cfg.reward is None:
        from .tasks import TASKS, Task

        if TASKS[cfg.task].reward is Task.reward:
            raise ValueError(f"task {cfg.task!r} defines no reward: pass reward='module:function'")
        return None
    if not isinstance(cfg.reward, str) or ":" not in cfg.reward:
        raise ValueError(f"reward must be 'module:function' naming a callable (prompt, completion) -> float, "
                         f"got {cfg.reward!r}")
    module, name = cfg.reward.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward {cfg.reward!r} cannot be loaded: {e}") from None
    if not callable(fn):
        raise ValueError(f"reward {cfg.reward!r} is not callable")
    return fn


def load_config(path: Optional[str] = None, **overrides) -> TrainConfig:
    """A ``TrainConfig`` from a ``.json`` or ``.yaml``/``.yml`` file (YAML needs pyyaml), then ``overrides``."""
    values: Dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        if path.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError:
                raise ValueError(f"config {path!r} is YAML but pyyaml is not installed; use JSON or "
                                 "`pip install pyyaml`") from None
            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError(f"config {path!r} must hold a mapping of field names to values")
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config field(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")
    return TrainConfig(**values)
