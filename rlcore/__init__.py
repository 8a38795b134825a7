"""rlcore: log-probabilities and RL losses for LLM post-training, computed from hidden states without logits."""

from .logprobs import BACKENDS, PRECISIONS, linear_logprobs
from .divergence import linear_divergence
from .fused import fused_policy_loss
from .losses import (AGGS, IS_MODES, KL_ESTIMATORS, LOSSES, RATIO_LEVELS, LossSpec, PolicyLossOutput, Terms,
                     policy_loss, register_loss, vstar)
from .loss_terms import LOSS_TYPES  # registers the built-in losses
from . import reference
from .advantages import group_advantages

__version__ = "0.1.0"

__all__ = [
    "linear_logprobs", "linear_divergence", "policy_loss", "fused_policy_loss", "vstar", "PolicyLossOutput",
    "LOSS_TYPES", "AGGS", "IS_MODES", "KL_ESTIMATORS", "RATIO_LEVELS", "LOSSES", "LossSpec", "Terms", "register_loss",
    "group_advantages",
    "reference", "PRECISIONS", "BACKENDS", "__version__"]
