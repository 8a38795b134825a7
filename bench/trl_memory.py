"""Peak memory of a TRL GRPO loss step with TRL 1.16's own fused LM head against rlcore's
(``rlcore.integrations.trl``), measured in one run: ``python -m bench.trl_memory [--vocab 32768 ...]``.

The step is what ``GRPOTrainer._compute_loss`` does to the head: ``model(input_ids, attention_mask, labels=...,
fused_lm_head=True)`` for the completion tokens' log-probs and entropies, the token-mean clipped loss on them, and
its backward to every parameter. The model is a one-layer random Qwen2 (a small backbone, so the head's share of the
peak is what differs), built from a config: nothing downloaded. Needs ``trl`` (not a dependency of rlcore).

Peak: ``rlcore.memory.peak_memory`` (CUDA: the allocator's peak; CPU: PyTorch's allocator events), the bytes the step
adds beyond what is live before it. Prints one JSON object; ``--out FILE`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from rlcore.memory import peak_memory


def _model(vocab: int, hidden: int, dtype: torch.dtype, device: torch.device):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=1, num_attention_heads=max(hidden // 64, 1),
                                   num_key_value_heads=1, tie_word_embeddings=False)
    return transformers.AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype)


def _step(model, ids, am, completion: int):
    """One loss step's head work: log-probs and entropies of the completion tokens, a clipped loss, backward."""
    labels = ids.masked_fill(am == 0, -100)
    labels[:, :-completion] = -100
    out = model(input_ids=ids, attention_mask=am, labels=labels, fused_lm_head=True)
    logp = out.log_probs[:, -completion:]
    mask = am[:, -completion:].float()
    adv = torch.linspace(-1, 1, ids.shape[0], device=ids.device)[:, None]
    ratio = torch.exp(logp - logp.detach())
    loss = (-torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv) * mask).sum() / mask.sum()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return float(loss)


def measure(vocab: int = 32768, hidden: int = 256, batch: int = 4, prompt: int = 64, completion: int = 448,
            dtype: str = "float32", device: str = "auto") -> dict:
    from trl.trainer.utils import add_fused_lm_head

    from rlcore.integrations import trl as rtrl

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, prompt + completion), generator=g).to(dev)
    am = torch.ones_like(ids)
    result = dict(vocab=vocab, hidden=hidden, batch=batch, prompt=prompt, completion=completion, dtype=dtype,
                  device=str(dev), torch=torch.__version__, python=platform.python_version())
    for name in ("trl", "rlcore"):
        model = _model(vocab, hidden, dt, dev)
        add_fused_lm_head(model, temperature=1.0, outputs=("log_probs", "entropy"))
        if name == "rlcore":
            rtrl._install_forward(model, 1.0, True, "default")
        _step(model, ids, am, completion)                       # warm-up (kernel builds, lazy state)
        peak, loss = peak_memory(lambda: _step(model, ids, am, completion), dev)
        result[f"peak_bytes_{name}"] = int(peak)
        result[f"loss_{name}"] = loss
    result["peak_ratio_rlcore_over_trl"] = result["peak_bytes_rlcore"] / result["peak_bytes_trl"]
    result["logits_bytes_fp32"] = batch * (prompt + completion) * vocab * 4
    import trl

    result["trl"] = trl.__version__
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--completion", type=int, default=448)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    a = p.parse_args(argv)
    res = measure(a.vocab, a.hidden, a.batch, a.prompt, a.completion, a.dtype, a.device)
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
