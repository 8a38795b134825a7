"""A thin RL trainer on Hugging Face transformers (and vLLM when installed), with rlcore's fused head and losses.

``rlcore train --algo gspo --out runs/gspo`` (or ``python -m rlcore train``) runs the embedded demo task; the same
from Python::

    from rlcore.trainer import TrainConfig, train
    history = train(TrainConfig(algo="apo", out="runs/apo"))

``algo="opd"`` and ``algo="kd"`` distil a teacher (``teacher=`` a model dir, or one trained first) into the policy.

Modules: ``config`` (the dataclass), ``algorithms`` (advantages, anchors, A*PO's V*, OAPL's buffer, opd and kd),
``rollout`` (engines and multi-turn trajectories), ``policy`` (hidden states + LM-head weight into
``fused_policy_loss``; the teacher), ``tasks`` (the default task, the calculator tool environment, the tokenizer),
``loop`` (the run), ``dist`` (torchrun: DDP / FSDP2), ``cli``.
"""

from .algorithms import ALGORITHMS, AlgoSpec
from .config import QUICK, ConfigError, TrainConfig, load_config
from .loop import RunError, Trainer, train
from .rollout import RolloutEngine, TransformersEngine
from .tasks import TASKS, CharTokenizer, Task

__all__ = ["TrainConfig", "ConfigError", "RunError", "load_config", "train", "Trainer", "ALGORITHMS", "AlgoSpec", "RolloutEngine",
           "TransformersEngine", "TASKS", "Task", "CharTokenizer", "QUICK"]
