"""rlcore inside other libraries' trainers, each imported on its own (they need those libraries; ``import rlcore``
never imports them):

- ``rlcore.integrations.hf``: the LM head of a Hugging Face causal LM (``head_of(model)``) and log-probs / fused
  losses from its hidden states, inside the head module's own call.
- ``rlcore.integrations.verl``: importing it registers every rlcore loss in verl's policy-loss registry as
  ``"rlcore_" + loss_type``.
- ``rlcore.integrations.trl``: ``install(trainer, loss=False)`` for TRL's ``GRPOTrainer``.
- ``rlcore.integrations.openrlhf``: ``PolicyLoss``, a drop-in for OpenRLHF's.
"""

__all__: list = []
