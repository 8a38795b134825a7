"""``TrainConfig``: every knob of a run in one dataclass, typed and checked at start-up, loadable from YAML or JSON.

Each field is declared with the values it accepts (``Int(ge=1)``, ``Real(gt=0)``, ``Choice(...)``); pydantic v2
parses what the user wrote into that type (``lr: 1e-3`` from YAML, which YAML reads as a string, becomes the float
0.001; ``resume: "no"`` becomes ``False``) and rejects what it cannot be, including ``inf`` and ``nan``. Then the
checks that span fields run (a group of one for a group method, a task with no reward, ...). All of it happens in
the constructor, before any model is built, and a failure is one :class:`ConfigError` (a ``ValueError``) naming the
field as written, the value, and what is accepted.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ..divergence import KINDS
from ..losses import IS_MODES
from .algorithms import ALGORITHMS, REWARD_ALGOS

__all__ = ["TrainConfig", "ConfigError", "load_config", "resolve_reward", "QUICK", "RESUME_FREE"]

ENGINES = ("auto", "transformers", "vllm")
PARALLEL = ("ddp", "fsdp2")
OPD_BASELINES = ("none", "full", "topk")
DTYPES = ("float32", "bfloat16", "float16")
HEAD_PRECISIONS = ("default", "tf32", "fp32")    # rlcore.PRECISIONS (not imported: rlcore.logprobs loads triton)


class ConfigError(ValueError):
    """A config field that cannot be used: ``field`` (as the user wrote it), ``value``, and what is ``accepted``.

    ``str(err)`` reads ``"<field> must be <accepted>, got <value>"`` plus an optional ``reason``."""

    def __init__(self, field: str, value: Any, accepted: str, reason: str = ""):
        self.field, self.value, self.accepted, self.reason = field, value, accepted, reason
        super().__init__(self.render(field))

    def render(self, label: str) -> str:
        """The message with the field called ``label`` (``--lr`` on the command line, ``lr`` in a file)."""
        text = f"{label} must be {self.accepted}, got {_shown(self.value)}"
        return f"{text} ({self.reason})" if self.reason else text


def _shown(value: Any) -> str:
    """A value as the user wrote it: ``-1e-3`` for the string YAML makes of it, ``'fp64'`` for a word."""
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", value.strip()):
        return value.strip()
    return repr(value)


# ----------------------------------------------------------------------------------------------------------------------
# field kinds: the type, its constraints, and the words for what is accepted
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """What a field accepts. ``py``: int, float, bool or str; ``ge``/``gt``/``lt``: bounds; ``choices``: a closed
    set; ``optional``: ``None`` allowed (with ``none`` saying what it means)."""

    py: type
    ge: Optional[float] = None
    gt: Optional[float] = None
    lt: Optional[float] = None
    choices: Tuple[str, ...] = ()
    optional: bool = False
    none: str = ""

    def accepted(self) -> str:
        if self.choices:
            text = "one of " + ", ".join(map(repr, self.choices))
        else:
            text = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}[self.py]
            bounds = [f"{op} {b:g}" for op, b in ((">=", self.ge), (">", self.gt), ("<", self.lt)) if b is not None]
            if bounds:
                text += " " + " and ".join(bounds)
        return f"{text}, or null ({self.none})" if self.optional else text

    def parse(self, name: str, value: Any) -> Any:
        """``value`` as this kind's type (pydantic's lax parsing: ``"1e-3"`` -> 0.001, ``"no"`` -> False), or
        :class:`ConfigError`."""
        if value is None or (self.optional and isinstance(value, str) and value.lower() in ("null", "none")):
            if self.optional:
                return None
            raise ConfigError(name, value, self.accepted())
        if self.py in (int, float) and isinstance(value, bool):
            raise ConfigError(name, value, self.accepted())    # True is not a number of steps
        try:
            parsed = _adapter(self.py).validate_python(value)
        except ValueError:
            raise ConfigError(name, value, self.accepted()) from None
        bad = ((self.choices and parsed not in self.choices)
               or (self.ge is not None and not parsed >= self.ge)
               or (self.gt is not None and not parsed > self.gt)
               or (self.lt is not None and not parsed < self.lt))
        if bad:
            raise ConfigError(name, value, self.accepted())
        return parsed


_ADAPTERS: Dict[type, Any] = {}


def _adapter(py: type):
    """A pydantic ``TypeAdapter`` for ``py`` (finite floats only), imported on first use."""
    if py not in _ADAPTERS:
        try:
            from pydantic import Field, TypeAdapter
        except ImportError:
            raise ImportError("the trainer's config needs pydantic>=2: pip install 'rlcore[hf]' (or pydantic)") from None
        from typing import Annotated

        tp = Annotated[float, Field(allow_inf_nan=False)] if py is float else py
        _ADAPTERS[py] = TypeAdapter(tp)
    return _ADAPTERS[py]


def _f(default: Any, kind: Kind, help: str):
    return field(default=default, metadata=dict(kind=kind, help=help))


POS = Kind(int, ge=1)


@dataclass
class TrainConfig:
    """One RL run. Defaults are the demo: the ``add`` task, a tiny random Llama, SFT warm-up, then RL.

    ``None`` for ``group_size``, ``prompts_per_step``, ``lr``, ``beta2``, ``eps_low``, ``eps_high`` means the
    algorithm's default (``rlcore.trainer.algorithms.ALGORITHMS``). ``fields_help()`` describes every field.
    """

    algo: str = _f("grpo", Kind(str, choices=tuple(ALGORITHMS)), "the RL algorithm")
    out: str = _f("runs/rlcore", Kind(str), "output folder: metrics.jsonl, checkpoint.pt, reward.png")
    seed: int = _f(0, Kind(int, ge=0), "seed of the model init, the prompts and the sampling")
    # ---- task and reward
    task: str = _f("add", Kind(str), "the task: 'add' (the demo) or 'calc' (multi-turn with a calculator tool)")
    task_digits: int = _f(2, POS, "digits of the task's operands")
    reward: Optional[str] = _f(None, Kind(str, optional=True, none="the task's own reward"),
                               "'module:function', a callable (prompt, completion) -> float")
    train_prompts: int = _f(768, POS, "prompts in the training pool")
    eval_prompts: int = _f(128, POS, "held-out prompts for the evaluation")
    # ---- policy
    model: Optional[str] = _f(None, Kind(str, optional=True, none="a tiny random Llama"),
                              "a local path for AutoModelForCausalLM")
    model_hidden: int = _f(64, POS, "hidden size of the tiny random Llama")
    model_layers: int = _f(2, POS, "layers of the tiny random Llama")
    model_heads: int = _f(2, POS, "attention heads of the tiny random Llama (head_dim 32: vLLM's CPU attention "
                                  "takes 32, 64, 80, ...)")
    dtype: str = _f("float32", Kind(str, choices=DTYPES), "dtype of the policy's weights")
    cpu_threads: Optional[int] = _f(1, Kind(int, ge=1, optional=True, none="torch's default"),
                                    "torch threads per process on CPU (a tiny model gains nothing from more)")
    head_precision: str = _f("fp32", Kind(str, choices=HEAD_PRECISIONS),
                             "rlcore.linear_logprobs precision of the LM head")
    # ---- SFT warm-up (the default task starts from a random model)
    sft_steps: int = _f(200, Kind(int, ge=0), "supervised warm-up steps on the task's demonstrations (0: none)")
    sft_batch: int = _f(64, POS, "prompts per SFT step")
    sft_lr: float = _f(3e-3, Kind(float, gt=0), "SFT learning rate")
    # ---- rollouts
    engine: str = _f("auto", Kind(str, choices=ENGINES), "rollout engine ('auto': transformers)")
    prompts_per_step: Optional[int] = _f(None, Kind(int, ge=1, optional=True, none="the algorithm's default"),
                                         "prompts per RL step")
    group_size: Optional[int] = _f(None, Kind(int, ge=1, optional=True, none="the algorithm's default"),
                                   "samples per prompt")
    max_new_tokens: int = _f(6, POS, "most tokens sampled per turn")
    temperature: float = _f(1.0, Kind(float, gt=0), "sampling temperature (also the head's)")
    # ---- optimisation
    steps: int = _f(300, POS, "RL steps (a resumed run continues up to this step)")
    lr: Optional[float] = _f(None, Kind(float, gt=0, optional=True, none="the algorithm's default"),
                             "RL learning rate (AdamW)")
    weight_decay: float = _f(0.0, Kind(float, ge=0), "AdamW weight decay")
    grad_clip: float = _f(1.0, Kind(float, gt=0), "gradient-norm clip")
    epochs: int = _f(1, POS, "gradient steps per rollout batch (> 1: the ratios leave 1 and clipping acts)")
    max_skipped: int = _f(3, POS, "stop the run after this many consecutive steps whose every update was skipped "
                                  "(non-finite loss or gradient)")
    # ---- loss knobs (None: the loss type's preset)
    eps_low: Optional[float] = _f(None, Kind(float, ge=0, lt=1, optional=True, none="the loss type's preset"),
                                  "lower clip range of the ratio (1 - eps_low)")
    eps_high: Optional[float] = _f(None, Kind(float, ge=0, optional=True, none="the loss type's preset"),
                                   "upper clip range of the ratio (1 + eps_high)")
    beta: float = _f(0.0, Kind(float, ge=0), "KL to the reference (clipped family; 0: none)")
    beta1: float = _f(0.5, Kind(float, gt=0), "V* temperature (apo, oapl)")
    beta2: Optional[float] = _f(None, Kind(float, gt=0, optional=True, none="the loss type's preset"),
                                "log-ratio scale of the regression family")
    eta: float = _f(1.0, Kind(float, gt=0), "reward scale of rebel")
    is_mode: Optional[str] = _f(None, Kind(str, choices=IS_MODES, optional=True, none="no correction"),
                                "training-inference correction from the sampler's log-probs (clipped family)")
    is_cap: float = _f(2.0, Kind(float, gt=0), "cap of the correction's importance weights")
    entropy_coef: float = _f(0.0, Kind(float), "entropy bonus coefficient")
    # ---- algorithm-specific
    apo_samples: int = _f(8, POS, "A*PO offline stage: samples per prompt from pi_ref")
    oapl_lag: int = _f(4, POS, "OAPL: the sampler is synced to the policy every oapl_lag steps")
    oapl_buffer: int = _f(4, POS, "OAPL: rollout batches kept; each step trains on one drawn from them")
    # ---- distillation (opd, kd): the student samples, the teacher scores every token
    teacher: Optional[str] = _f(None, Kind(str, optional=True, none="train one first, in out/teacher"),
                                "opd/kd: the teacher's model dir (out/model of an rlcore train run, or any "
                                "AutoModelForCausalLM dir over the student's vocabulary)")
    teacher_algo: str = _f("gspo", Kind(str, choices=REWARD_ALGOS), "the algorithm that trains the teacher first")
    teacher_steps: int = _f(300, POS, "RL steps of the teacher trained first")
    teacher_hidden: int = _f(64, POS, "hidden size of the teacher trained first (a tiny random Llama)")
    teacher_layers: int = _f(2, POS, "layers of the teacher trained first")
    teacher_heads: int = _f(2, POS, "attention heads of the teacher trained first")
    opd_baseline: str = _f("full", Kind(str, choices=OPD_BASELINES),
                           "opd's control variate b_t = -KL(p_S || p_T) per token: over the full vocabulary, the "
                           "teacher's top_k ids, or none")
    kd_kind: str = _f("reverse_kl", Kind(str, choices=KINDS), "kd's divergence of the student to the teacher")
    jsd_beta: float = _f(0.5, Kind(float, gt=0, lt=1), "kd's JSD mixture weight (kd_kind 'jsd')")
    top_k: Optional[int] = _f(None, Kind(int, ge=1, optional=True, none="the full vocabulary"),
                              "the teacher's top-k ids the divergence is restricted to (kd; opd_baseline 'topk')")
    # ---- bookkeeping
    eval_every: int = _f(25, POS, "evaluate every this many steps")
    log_every: int = _f(25, POS, "print a line every this many steps")
    save_every: int = _f(50, POS, "write the checkpoint every this many steps")
    resume: bool = _f(True, Kind(bool), "continue from out/checkpoint.pt when it exists")
    force_resume: bool = _f(False, Kind(bool), "resume even when the checkpoint's settings differ from this run's")
    plot: bool = _f(True, Kind(bool), "write out/reward.png (needs matplotlib)")
    progress: bool = _f(True, Kind(bool), "show a progress bar (needs tqdm)")
    parallel: str = _f("ddp", Kind(str, choices=PARALLEL), "data parallelism under torchrun")
    quick: bool = _f(False, Kind(bool), "the shortened demo: fields left at their default take QUICK's values")

    def __post_init__(self):
        self.quick = _field_kind("quick").parse("quick", self.quick)
        if self.quick:
            for key, value in QUICK.items():
                if getattr(self, key) == _DEFAULTS[key]:
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

    @classmethod
    def fields_help(cls) -> Dict[str, Tuple[str, Kind]]:
        """``{field: (description, kind)}`` for every field (the CLI's ``-h``)."""
        return {f.name: (f.metadata["help"], f.metadata["kind"]) for f in dataclasses.fields(cls)}

    def validate(self) -> None:
        """Parse every field to its declared type, then check the fields against each other; raise
        :class:`ConfigError` naming the first bad field."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.metadata["kind"].parse(f.name, getattr(self, f.name)))
        self._check_combinations()
        resolve_reward(self)

    def _check_combinations(self) -> None:
        from .tasks import TASKS

        if self.task not in TASKS:
            raise ConfigError("task", self.task, "one of " + ", ".join(map(repr, TASKS)))
        spec, g, algo = self.spec, self.group, self.algo
        if spec.grouped and g < 2:
            raise ConfigError("group_size", g, ">= 2", f"algo {algo!r} compares the samples of a prompt with "
                                                       "each other")
        if algo == "rebel" and g % 2:
            raise ConfigError("group_size", g, "even", "algo 'rebel' trains on pairs of samples of a prompt")
        if algo == "apo" and g != 1:
            raise ConfigError("group_size", g, "1", "algo 'apo' samples one completion per prompt online; V* "
                                                    "replaces the group")
        if self.is_mode is not None and spec.family == "regression":
            raise ConfigError("is_mode", self.is_mode, "null", f"is_mode corrects the clipped family's ratios; "
                              f"algo {algo!r} is a regression loss, anchored at a fixed policy already")
        if self.model is None and self.model_hidden % self.model_heads:
            raise ConfigError("model_hidden", self.model_hidden, f"a multiple of model_heads = {self.model_heads}")
        if self.eps_low is not None and self.eps_high is not None and self.eps_low == 0 == self.eps_high:
            raise ConfigError("eps_high", self.eps_high, "> 0 when eps_low is 0", "a clip range of width 0 "
                              "freezes the ratio at 1: nothing would be learned")
        self._check_distillation()

    def _check_distillation(self) -> None:
        algo, distill = self.algo, self.spec.distill
        if distill is None:
            if self.teacher is not None:
                raise ConfigError("teacher", self.teacher, "null", f"algo {algo!r} learns from the reward; only "
                                  "'opd' and 'kd' distil from a teacher")
            return
        if self.teacher is not None:
            path = Path(self.teacher)
            if not (path / "config.json").is_file():
                why = "no such directory" if not path.is_dir() else "it holds no config.json"
                raise ConfigError("teacher", self.teacher, "a model directory (out/model of a run, or a Hugging "
                                  "Face model dir)", why)
        elif self.model is None and self.teacher_hidden % self.teacher_heads:
            raise ConfigError("teacher_hidden", self.teacher_hidden,
                              f"a multiple of teacher_heads = {self.teacher_heads}")
        if self.beta:
            raise ConfigError("beta", self.beta, "0", f"algo {algo!r} is anchored at the teacher; it takes no KL to "
                              "a reference")
        uses_top_k = distill == "kd" or self.opd_baseline == "topk"
        if distill == "opd" and self.opd_baseline == "topk" and self.top_k is None:
            raise ConfigError("top_k", None, "an integer >= 1", "opd_baseline 'topk' is the KL over the teacher's "
                              "top_k ids")
        if self.top_k is not None and not uses_top_k:
            raise ConfigError("top_k", self.top_k, "null", f"opd_baseline is {self.opd_baseline!r}; top_k only "
                              "restricts opd_baseline 'topk' (and kd)")

    def teacher_config(self) -> "TrainConfig":
        """The run that trains the teacher when ``teacher`` is null: this run's task, data, warm-up, sampling and
        bookkeeping, with ``teacher_algo`` (its defaults) for ``teacher_steps`` steps on the teacher's tiny Llama
        (or on ``model``), in ``out/teacher``. Its ``out/teacher/model`` is the teacher."""
        shared = {k: getattr(self, k) for k in TEACHER_SHARED}
        return TrainConfig(**shared, algo=self.teacher_algo, steps=self.teacher_steps,
                           out=str(Path(self.out) / "teacher"), model_hidden=self.teacher_hidden,
                           model_layers=self.teacher_layers, model_heads=self.teacher_heads)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


_DEFAULTS: Dict[str, Any] = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _field_kind(name: str) -> Kind:
    return TrainConfig.__dataclass_fields__[name].metadata["kind"]

# The demo shortened to a few minutes on a 2-core CPU (rlcore train --quick; opd and kd: the teacher's run too).
QUICK: Dict[str, Any] = dict(steps=120, teacher_steps=120, eval_every=20, log_every=20, save_every=60)

# What the teacher trained first shares with the student's run (TrainConfig.teacher_config).
TEACHER_SHARED = ("seed", "task", "task_digits", "reward", "train_prompts", "eval_prompts", "model", "dtype",
                  "cpu_threads", "head_precision", "sft_steps", "sft_batch", "sft_lr", "engine", "max_new_tokens",
                  "temperature", "weight_decay", "grad_clip", "max_skipped", "eval_every", "log_every", "save_every",
                  "resume", "force_resume", "plot", "progress", "parallel")

# Fields a resumed run may change: bookkeeping that does not alter what the next step computes.
RESUME_FREE = frozenset({"out", "steps", "resume", "force_resume", "plot", "progress", "eval_every", "log_every",
                         "save_every", "cpu_threads", "quick", "engine", "max_skipped"})


def resolve_reward(cfg: TrainConfig):
    """The reward callable: ``cfg.reward`` (``"module:function"``) if given, else the task's own ``reward``
    (returned as ``None``).

    Raises :class:`ConfigError` when there is none, so a run never starts without a reward.
    """
    accepted = "'module:function' naming a callable (prompt, completion) -> float"
    if cfg.reward is None:
        from .tasks import TASKS, Task

        if TASKS[cfg.task].reward is Task.reward:
            raise ConfigError("reward", None, accepted, f"task {cfg.task!r} defines no reward")
        return None
    if ":" not in cfg.reward:
        raise ConfigError("reward", cfg.reward, accepted)
    module, name = cfg.reward.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError("reward", cfg.reward, accepted, f"it cannot be loaded: {e}") from None
    if not callable(fn):
        raise ConfigError("reward", cfg.reward, accepted, "it is not callable")
    return fn


def _read_file(path: str) -> Dict[str, Any]:
    """The mapping in a ``.json`` or ``.yaml``/``.yml`` file; ``ValueError`` naming the file for anything else."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"config {path!r} cannot be read: {e.strerror or e}") from None
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"config {path!r} is YAML but pyyaml is not installed; use JSON or "
                             "`pip install pyyaml`") from None
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"config {path!r} is not valid YAML{at}: {problem}") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config {path!r} is not valid JSON at line {e.lineno}, column {e.colno}: "
                             f"{e.msg}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config {path!r} must hold a mapping of field names to values, got a "
                         f"{type(values).__name__}")
    return values


def load_config(path: Optional[str] = None, **overrides) -> TrainConfig:
    """A ``TrainConfig`` from a ``.json`` or ``.yaml``/``.yml`` file (YAML needs pyyaml), then ``overrides``
    (``None`` values are ignored)."""
    values: Dict[str, Any] = _read_file(path) if path is not None else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = set(_DEFAULTS)
    unknown = sorted(set(values) - known)
    if unknown:
        hints = [f"{u!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(str(u), known, 1))
                 else repr(u) for u in unknown]
        raise ValueError(f"unknown config field(s) {', '.join(hints)}; known: {', '.join(sorted(known))}")
    return TrainConfig(**values)
