"""Tasks: prompts, a verifiable reward, SFT demonstrations, and (for multi-turn tasks) an environment.

The embedded default task needs no download: :class:`CharTokenizer` is a character-level tokenizer over a dozen
symbols, and the prompts are generated. Two tasks ship:

``add``
    ``"47+8="`` -> ``"55"`` (a number below ``10**digits`` plus a digit: 1000 prompts by default). The reward is 1
    for the exact sum followed by EOS, else 0. A 2-layer model learns the format and part of the arithmetic (the
    carries) in a short SFT; sampling then errs often enough for RL to have room.
``calc``
    A multi-turn tool-use task: ``"23*4="``. The policy calls a calculator by writing ``[23*4]``; the environment
    answers with the observation ``92|`` (tokens the policy did not write, so they are masked out of the loss); the
    policy then writes the answer ``92`` and EOS. The reward is 1 for the right product.

A reward function is a plain callable ``reward(prompt: str, completion: str) -> float``; ``completion`` is the text
the policy wrote (observations included, for multi-turn tasks) without the EOS.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["CharTokenizer", "Task", "AdditionTask", "CalculatorTask", "TASKS", "make_task", "RewardFn"]

RewardFn = Callable[[str, str], float]


class CharTokenizer:
    """One token per character, plus ``<pad>`` (0), ``<bos>`` (1) and ``<eos>`` (2).

    Small on purpose: the tiny demo models have a vocabulary of ~20 rows, so the head, the sampler and the fused
    log-probs all run in milliseconds on a CPU.
    """

    PAD, BOS, EOS = 0, 1, 2

    def __init__(self, alphabet: str = "0123456789+*=[]|"):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet has repeated characters: {alphabet!r}")
        self.alphabet = alphabet
        self._ids = {c: i + 3 for i, c in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 3

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> List[int]:
        try:
            ids = [self._ids[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer's alphabet {self.alphabet!r}") from None
        return ([self.BOS] if bos else []) + ids + ([self.EOS] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, without special tokens; stops at the first EOS."""
        out = []
        for i in ids:
            if i == self.EOS:
                break
            if i >= 3:
                out.append(self.alphabet[i - 3])
        return "".join(out)


@dataclass
class Task:
    """A verifiable task. Subclasses generate prompts and demonstrations and define the reward.

    ``stop_text``: characters that end a policy turn early (besides EOS); a multi-turn task's environment then
    answers via :meth:`observe`.
    """

    tokenizer: CharTokenizer
    seed: int = 0
    stop_text: str = ""
    max_turns: int = 1

    def sample_prompt(self, rng: random.Random) -> str:
        raise NotImplementedError

    def demonstration(self, prompt: str) -> List[Tuple[str, bool]]:
        """A correct completion of ``prompt`` for the SFT warm-up, as ``(text, written_by_policy)`` segments: the
        environment's observations are ``False`` (no loss on them). Without the EOS."""
        raise NotImplementedError

    def reward(self, prompt: str, completion: str) -> float:
        raise NotImplementedError

    def observe(self, prompt: str, completion: str) -> Optional[str]:
        """The environment's reply after a turn that ended in a stop character, or ``None`` to end the episode."""
        return None

    def splits(self, n_train: int, n_eval: int) -> Tuple[List[str], List[str]]:
        """Disjoint lists of distinct training and evaluation prompts, deterministic in ``seed``."""
        rng = random.Random(self.seed)
        seen, out = set(), []
        for _ in range(1000 * (n_train + n_eval)):
            if len(out) == n_train + n_eval:
                break
            p = self.sample_prompt(rng)
            if p not in seen:
                seen.add(p)
                out.append(p)
        else:
            raise ValueError(f"the task has fewer than n_train + n_eval = {n_train + n_eval} distinct prompts")
        return out[n_eval:], out[:n_eval]


class AdditionTask(Task):
    """``"a+b="`` -> the decimal sum, ``a < 10**digits``, ``b < 10``."""

    def __init__(self, tokenizer: CharTokenizer, seed: int = 0, digits: int = 2):
        super().__init__(tokenizer, seed)
        self.digits = digits

    def sample_prompt(self, rng: random.Random) -> str:
        hi = 10 ** self.digits - 1
        return f"{rng.randint(0, hi)}+{rng.randint(0, 9)}="

    def demonstration(self, prompt: str) -> List[Tuple[str, bool]]:
        return [(self._answer(prompt), True)]

    @staticmethod
    def _answer(prompt: str) -> str:
        a, b = prompt[:-1].split("+")
        return str(int(a) + int(b))

    def reward(self, prompt: str, completion: str) -> float:
        return float(completion == self._answer(prompt))


class CalculatorTask(Task):
    """``"a*b="``: call the calculator as ``[a*b]``, read the observation ``<value>|``, answer ``<value>``."""

    def __init__(self, tokenizer: CharTokenizer, seed: int = 0, digits: int = 2):
        super().__init__(tokenizer, seed, stop_text="]", max_turns=2)
        self.digits = digits

    def sample_prompt(self, rng: random.Random) -> str:
        hi = 10 ** self.digits - 1
        return f"{rng.randint(0, hi)}*{rng.randint(0, 9)}="

    @staticmethod
    def _value(expr: str) -> Optional[int]:
        parts = expr.split("*")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            return None
        return int(parts[0]) * int(parts[1])

    def demonstration(self, prompt: str) -> List[Tuple[str, bool]]:
        expr = prompt[:-1]
        value = self._value(expr)
        return [(f"[{expr}]", True), (f"{value}|", False), (str(value), True)]

    def observe(self, prompt: str, completion: str) -> Optional[str]:
        if not completion.endswith("]") or "[" not in completion:
            return None
        value = self._value(completion[completion.rindex("[") + 1:-1])
        return f"{'' if value is None else value}|"

    def reward(self, prompt: str, completion: str) -> float:
        answer = completion.rsplit("|", 1)[-1] if "|" in completion else completion
        return float(answer == str(self._value(prompt[:-1])))


TASKS: Dict[str, type] = {"add": AdditionTask, "calc": CalculatorTask}


def make_task(name: str, seed: int = 0, digits: int = 2) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(map(repr, TASKS))}")
    return TASKS[name](CharTokenizer(), seed=seed, digits=digits)
