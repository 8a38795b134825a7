"""rlcore: log-probabilities and RL losses for LLM post-training, computed from hidden states without logits."""

from .logprobs import BACKENDS, PRECISIONS, linear_logprobs
from . import reference

__version__ = "0.1.0"

__all__ = ["linear_logprobs", "reference", "PRECISIONS", "BACKENDS", "__version__"]
