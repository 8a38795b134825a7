"""LM-head shapes of real models, and the token counts N each is benchmarked at.

A head is ``hidden [N, H] @ weight[V, H].T``; only H and V matter to the op, so a model is named by its head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["Shape", "SHAPES", "tokens_for", "default_shapes"]


@dataclass(frozen=True)
class Shape:
    """An LM head: ``H`` hidden size, ``V`` vocabulary rows of the weight.

    ``tokens`` overrides the device's token counts (for shapes that only make sense at one size, like ``tiny``).
    """

    name: str
    H: int
    V: int
    note: str
    tokens: Optional[tuple[int, ...]] = None


SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("llama3-8b", 4096, 128256, "Llama-3/3.1-8B: hidden 4096, 128256-token tiktoken vocabulary"),
    Shape("qwen2.5-7b", 3584, 152064, "Qwen2.5-7B: hidden 3584, vocab 152064 (embedding padded past the tokenizer)"),
    Shape("qwen3", 4096, 151936, "Qwen3-8B: hidden 4096, vocab 151936 (Qwen3-4B/14B share V, differ in H)"),
    # The Gemma 3 tokenizer has 262144 (2^18) entries; the HF configs of the 4B/12B/27B checkpoints list
    # vocab_size 262208 (64 more rows). 262144 is kept here; 262208 would be the less block-aligned case.
    Shape("gemma3", 3840, 262144, "Gemma-3-12B: hidden 3840, the 256k (262144) Gemma 3 vocabulary"),
    Shape("cpu-small", 1024, 32000, "a 32000 (Llama-2/Mistral-7B) vocabulary on a small hidden: sized for CPU"),
    # N = 100 is below the 256-row error sample and not a multiple of any block; 1024 is a round size.
    Shape("tiny", 64, 1000, "for tests: a whole --quick run in seconds", tokens=(100, 1024)),
)}

# Token counts N per (device type, quick), and per case where they differ: 1k to 64k tokens on GPU, where a provider
# that would not fit (the materialised reference at 64k x 128k-262k logits) is skipped with the memory it needs.
# - CPU: 0.2-0.4 TFLOP/s on the 2 cores of the dev box, so one cpu-small fwd_bwd call at N = 8192 is seconds of bare
#   GEMMs and the full run stops at 16k. --quick runs every case at N = 1024 only (the policy losses as 4 sequences
#   of 256 tokens: see bench.cases.loss_layout): a few minutes and under 2 GB of memory on a 2-core CPU. N = 8192,
#   where the materialised reference's [N, V] logits and their gradient cost 5 GB, is in the full run only.
# - GPU: bf16 RL micro-batches, 1k-64k tokens.
_LOSS_CASES = ("loss_gspo", "loss_cispo", "loss_apo")
_TOKENS = {
    ("cpu", True): (1024,),
    ("cpu", False): {"fwd": (1024, 4096, 16384), "fwd_bwd": (1024, 4096, 8192, 16384),
                     **{c: (2048, 8192) for c in _LOSS_CASES}, "distill": (1024, 8192)},
    ("cuda", True): (4096, 16384),
    ("cuda", False): (1024, 4096, 16384, 65536),
}

_DEFAULT_SHAPES = {
    ("cpu", True): ("cpu-small",),
    ("cpu", False): ("cpu-small",),
    ("cuda", True): ("llama3-8b",),
    ("cuda", False): ("llama3-8b", "qwen2.5-7b", "qwen3", "gemma3"),
}


def tokens_for(shape: Shape, case: str, device_type: str, quick: bool) -> tuple[int, ...]:
    """The token counts N that ``shape`` is run at, in ``case``, on this device type."""
    if shape.tokens is not None:
        return shape.tokens
    tokens = _TOKENS[("cuda" if device_type == "cuda" else "cpu", quick)]
    return tokens[case] if isinstance(tokens, dict) else tokens


def default_shapes(device_type: str, quick: bool) -> tuple[str, ...]:
    """The shapes run when ``--shapes`` is not given."""
    return _DEFAULT_SHAPES[("cuda" if device_type == "cuda" else "cpu", quick)]
