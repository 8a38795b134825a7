"""The LM head of a Hugging Face causal LM, as rlcore computes it: ``head_of(model)``.

A causal LM's next-token distribution is ``softmax(post(h W^T + b) / temperature)``, where ``post`` is what the model's
own forward does to the head's output. ``head_of`` reads that once from the model and its config and maps it onto
:func:`rlcore.linear_logprobs`, exactly, or raises:

- the head: ``model.get_output_embeddings()``, an ``nn.Linear`` (weight, optional bias; tied embeddings are the same
  parameter, so their gradient reaches the embedding); under PEFT, the LoRA-wrapped head is folded exactly,
  ``W + sum_a scaling_a B_a A_a`` (a differentiable tensor: the adapters get their gradients), and a head in
  ``modules_to_save`` is read through its active copy. What cannot be folded (DoRA, dropout on the head's adapter in
  training mode, ``fan_in_fan_out``, another tuner type) is a ``ValueError``. LoRA elsewhere needs nothing.
- a logit scale ``s`` (Cohere ``logit_scale``, Granite / MiniCPM3 ``1 / logits_scaling``, Falcon-H1
  ``lm_head_multiplier``, ``output_multiplier``): ``z s / T = z / (T / s)``, so it is the kernel's ``temperature``
  (``T / s``), no new kernel option; it must be > 0.
- a soft cap ``c`` (Gemma 2/3 ``final_logit_softcapping``): the kernel's ``softcap=c``. With a scale too (applied
  first, as the models do), ``c tanh(s a / c) = s (c / s) tanh(a / (c / s))``: ``softcap=c / s``.
- any other head option rlcore knows of and cannot reproduce: a ``ValueError`` naming it, never a different log-prob.

The fused computation runs **inside the head module's own call** (``module(hidden)`` with its forward swapped for the
call's duration), so hooks on that module run as for the model's own forward: FSDP / FSDP2 unshard its weight and
reshard it after, DeepSpeed ZeRO-3 gathers it, accelerate moves the inputs to its device (with an accelerate hook the
hooked ``_old_forward`` is swapped instead). A weight still sharded as a DTensor when read is gathered
(``full_tensor()``, differentiably), never taken as rlcore's vocabulary-parallel head: FSDP's ranks hold different
data. Under ZeRO-3, a LoRA-wrapped head's adapter weights live in submodules whose own hooks this call does not run;
gather them (``deepspeed.zero.GatheredParameters``) or leave the head out of ``target_modules``.

Example::

    head = rlcore.integrations.hf.head_of(model)
    hidden = rlcore.integrations.hf.hidden_states(model, input_ids=ids, attention_mask=am)   # [B, T, H]
    logp = head.logprobs(hidden[:, :-1], ids[:, 1:], temperature=0.7)                          # [B, T - 1]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch
from torch import nn

from ..distributed import is_dtensor
from ..fused import fused_policy_loss
from ..logprobs import linear_logprobs

__all__ = ["Head", "head_of", "hidden_states", "UNSUPPORTED_CONFIG"]

# Config attributes that change the head's output in ways rlcore does not reproduce (a non-default value raises).
UNSUPPORTED_CONFIG = {
    "dim_model_base": None,          # MiniCPM (1/2): hidden states divided by hidden_size / dim_model_base
    "mup_width_multiplier": None,    # muP models that scale logits by the width
    "logit_softcapping": None,       # a soft cap under a name no model in transformers uses for the final logits
}


def _config(model) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _logit_scale(cfg) -> Tuple[float, Optional[str]]:
    """``(s, name)``: the factor the model multiplies its logits by before any cap, and the config name it came from."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(cfg, name, None)
        if value is not None:
            return float(value), name
    value = getattr(cfg, "logits_scaling", None)
    if value is not None:
        if getattr(cfg, "model_type", None) == "hyperclovax":     # the one family that multiplies by it
            return float(value), "logits_scaling"
        if value == 0:
            raise ValueError("config.logits_scaling is 0: the model divides its logits by it")
        return 1.0 / float(value), "logits_scaling"
    return 1.0, None


def _unwrap_peft(model):
    """The causal LM inside a PEFT model (``PeftModel.get_base_model()``), else ``model`` itself."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__module__.startswith("peft"):
        return get_base()
    return model


def _active(module) -> Tuple[str, ...]:
    names = getattr(module, "active_adapters", None)
    if names is None:
        names = getattr(module, "active_adapter", ())
    return (names,) if isinstance(names, str) else tuple(names)


def _resolve_module(module: nn.Module) -> nn.Module:
    """The module that computes the head: through PEFT's ``ModulesToSaveWrapper`` to its active copy."""
    if type(module).__name__ == "ModulesToSaveWrapper":
        names = [a for a in _active(module) if a in module.modules_to_save]
        if getattr(module, "disable_adapters", False) or not names:
            return _resolve_module(module.original_module)
        if len(names) > 1:
            raise ValueError(f"the head is in modules_to_save with several active adapters {names}; activate one")
        return _resolve_module(module.modules_to_save[names[0]])
    return module


def _lora_parts(module: nn.Module) -> Optional[list]:
    """``[(A [r, H], B [V, r], scaling, lora_bias | None)]`` of a PEFT ``lora.Linear`` head's active adapters (empty
    when merged or disabled); ``None`` when ``module`` is no PEFT layer. Raises where a fold would not be exact."""
    if not hasattr(module, "base_layer"):
        return None
    kind = type(module).__name__
    if kind != "Linear" or not hasattr(module, "lora_A"):
        raise ValueError(f"the LM head is wrapped by PEFT's {type(module).__module__}.{kind}; rlcore folds only LoRA "
                         "(lora.Linear) heads exactly. Leave the head out of target_modules")
    if getattr(module, "fan_in_fan_out", False):
        raise ValueError("the LM head's LoRA has fan_in_fan_out=True; rlcore folds only the nn.Linear layout")
    if getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return []
    parts = []
    for name in _active(module):
        if name not in module.lora_A:
            continue
        if getattr(module, "use_dora", {}).get(name, False):
            raise ValueError(f"the LM head's LoRA adapter {name!r} uses DoRA, whose norm rlcore does not fold; "
                             "leave the head out of target_modules")
        dropout = module.lora_dropout[name]
        if module.training and not isinstance(dropout, nn.Identity) and getattr(dropout, "p", 0.0) > 0:
            raise ValueError(f"the LM head's LoRA adapter {name!r} has dropout p={dropout.p} in training mode: "
                             "random per element, not a linear map rlcore can fold; set lora_dropout=0 or leave "
                             "the head out of target_modules")
        a, b = module.lora_A[name], module.lora_B[name]
        if not (isinstance(a, nn.Linear) and isinstance(b, nn.Linear)):
            raise ValueError(f"the LM head's LoRA adapter {name!r} is not a pair of nn.Linear layers")
        parts.append((a.weight, b.weight, float(module.scaling[name]), b.bias))
    return parts


@dataclass
class Head:
    """The head of ``model`` as rlcore computes it. ``temperature_scale`` ``s`` and ``softcap`` are the head's own
    (from its config); :meth:`logprobs` and :meth:`policy_loss` combine them with the caller's temperature."""

    model: nn.Module              # the causal LM (inside a PEFT wrapper, the wrapped model)
    module: nn.Module             # its output-embeddings module, as the model calls it
    logit_scale: float = 1.0
    softcap: float = 0.0

    def compute_module(self) -> nn.Module:
        """The module that computes the head now (PEFT's active ``modules_to_save`` copy, or ``module``)."""
        return _resolve_module(self.module)

    def weight_and_bias(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(W [V, H], b [V] | None)`` as the head applies them now: LoRA folded in, differentiably. Read inside the
        module's call when the weight is sharded (see :meth:`call`)."""
        mod = self.compute_module()
        parts = _lora_parts(mod)
        base = mod.base_layer if parts is not None else mod
        w, b = base.weight, base.bias
        w, b = _full(w), _full(b)
        for a, bm, scaling, lora_bias in parts or ():
            w = w + (_full(bm) @ _full(a)).to(w.dtype) * scaling
            if lora_bias is not None:
                b = _full(lora_bias) * scaling if b is None else b + _full(lora_bias) * scaling
        return w, b

    def kernel_options(self, temperature: float = 1.0) -> dict:
        """``linear_logprobs``'s ``temperature`` and ``softcap`` for this head at the caller's ``temperature``."""
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a float > 0, got {temperature!r}")
        s = self.logit_scale
        return {"temperature": float(temperature) / s, "softcap": self.softcap / s if self.softcap else 0.0}

    def call(self, fn: Callable, hidden: torch.Tensor):
        """``fn(hidden)`` run as the head module's forward, through ``module(hidden)``: its hooks (FSDP unshard,
        ZeRO-3 gather, accelerate device moves) run around it as for the model's own call.

        ``fn`` runs with autocast off: rlcore computes the head from the tensors it is given, in FP32 (an autocast
        context would otherwise round its GEMMs to bf16). Half hidden states under an FP32 head (the backbone under
        autocast) run with ``precision="fp32"``, the mixed pair ``linear_logprobs`` takes."""
        mod = self.compute_module()
        attr = "_old_forward" if hasattr(mod, "_hf_hook") and hasattr(mod, "_old_forward") else "forward"
        saved = mod.__dict__.get(attr, None)
        device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else "cpu"

        def no_autocast(h):
            with torch.autocast(device_type, enabled=False):
                return fn(h)
        setattr(mod, attr, no_autocast)
        try:
            return mod(hidden)
        finally:
            if saved is None:
                delattr(mod, attr)
            else:
                setattr(mod, attr, saved)

    def logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                 return_entropy: bool = False, **kwargs):
        """:func:`rlcore.linear_logprobs` of ``targets [...]`` under this head on ``hidden [..., H]`` (the caller
        shifts by one), at the sampling ``temperature``; other keywords are ``linear_logprobs``'s. See
        :meth:`call` for autocast and mixed dtypes."""
        self._no_head_options(kwargs)
        opts = self.kernel_options(temperature)
        asked = kwargs.pop("precision", "default")

        def forward(h):
            w, b = self.weight_and_bias()
            h, precision = _match_dtypes(h, w, asked)
            return linear_logprobs(h, w, targets.to(h.device), bias=b, return_entropy=return_entropy, **opts,
                                   precision=precision, **kwargs)
        return self.call(forward, hidden)

    def policy_loss(self, hidden: torch.Tensor, targets: torch.Tensor, advantages, mask, *,
                    temperature: float = 1.0, **kwargs):
        """:func:`rlcore.fused_policy_loss` under this head (same arguments, ``weight``/``bias`` from the head)."""
        self._no_head_options(kwargs)
        opts = self.kernel_options(temperature)
        asked = kwargs.pop("precision", "default")

        def forward(h):
            w, b = self.weight_and_bias()
            h, precision = _match_dtypes(h, w, asked)
            return fused_policy_loss(h, w, targets, advantages, mask, bias=b, precision=precision, **opts, **kwargs)
        return self.call(forward, hidden)

    @staticmethod
    def _no_head_options(kwargs):
        for key in ("weight", "bias", "softcap"):
            if key in kwargs:
                raise TypeError(f"{key}= comes from the model's head and config; do not pass it")


def _full(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A DTensor parameter (FSDP2 outside its unshard, or a tensor-parallel plan) gathered, differentiably: the data
    may differ across the mesh (FSDP), so it is never read as rlcore's vocabulary-parallel head."""
    return x.full_tensor() if is_dtensor(x) else x


def _match_dtypes(h: torch.Tensor, w: torch.Tensor, precision: str) -> Tuple[torch.Tensor, str]:
    """``(hidden, precision)`` that ``linear_logprobs`` takes with the head weight ``w``: half hidden states under
    an FP32 head keep their dtype with ``precision="fp32"``; any other mismatch casts the hidden states to ``w``'s
    dtype."""
    if h.dtype == w.dtype:
        return h, precision
    if h.dtype in (torch.bfloat16, torch.float16) and w.dtype == torch.float32:
        return h, "fp32"
    return h.to(w.dtype), precision


def head_of(model: nn.Module) -> Head:
    """The LM head of a Hugging Face causal LM (or a PEFT model around one), checked to be one rlcore computes
    exactly. Raises ``ValueError`` naming what was looked for or what cannot be reproduced."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a Hugging Face causal LM), got {type(model).__name__}")
    lm = _unwrap_peft(model)
    get = getattr(lm, "get_output_embeddings", None)
    module = get() if callable(get) else None
    if module is None:
        module = getattr(lm, "lm_head", None)
    if not isinstance(module, nn.Module):
        raise ValueError(f"no LM head found on {type(lm).__name__}: looked for get_output_embeddings() and an "
                         "lm_head attribute; pass a causal LM (e.g. AutoModelForCausalLM), not a backbone")
    resolved = _resolve_module(module)
    parts = _lora_parts(resolved)
    base = resolved.base_layer if parts is not None else resolved
    if type(base) is not nn.Linear:
        raise ValueError(f"the LM head of {type(lm).__name__} is a {type(base).__name__}, not an nn.Linear: rlcore "
                         "computes h W^T + b heads only")
    cfg = _config(lm)
    for name, default in UNSUPPORTED_CONFIG.items():
        if getattr(cfg, name, default) not in (default, 1, 1.0):
            raise ValueError(f"config.{name}={getattr(cfg, name)!r} changes the logits in a way rlcore does not "
                             "reproduce; refusing rather than computing different log-probs")
    scale, scale_name = _logit_scale(cfg)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"config.{scale_name} gives a logit scale of {scale}: rlcore maps a scale onto the "
                         "temperature, which needs a finite scale > 0")
    cap = getattr(cfg, "final_logit_softcapping", None)
    cap = 0.0 if cap is None else float(cap)
    if not (math.isfinite(cap) and cap >= 0):
        raise ValueError(f"config.final_logit_softcapping={cap} must be finite and > 0 (or None)")
    return Head(model=lm, module=module, logit_scale=scale, softcap=cap)


def hidden_states(model: nn.Module, *args, **kwargs) -> torch.Tensor:
    """The final hidden states ``[B, T, H]`` (after the last norm) of a causal LM, from its backbone
    (``model.base_model``), without computing any logits. Arguments are the backbone's (``input_ids``,
    ``attention_mask``, ``position_ids``, ...)."""
    lm = _unwrap_peft(model)
    backbone = getattr(lm, "base_model", None)
    if backbone is None or backbone is lm:
        raise ValueError(f"{type(lm).__name__} has no backbone under base_model (base_model_prefix="
                         f"{getattr(lm, 'base_model_prefix', None)!r}); pass a Hugging Face causal LM")
    kwargs.setdefault("use_cache", False)
    out = backbone(*args, **kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
