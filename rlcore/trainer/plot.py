"""The reward curve as a PNG (matplotlib optional: without it, nothing is drawn and the caller says so)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

__all__ = ["plot_rewards"]


def plot_rewards(history: List[Dict], path: Path, title: str = "") -> Optional[Path]:
    """Training reward per step (and its running mean), the held-out reward, and the teacher's held-out reward as
    horizontal lines when the history holds it (opd, kd); ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [r for r in history if r["step"] > 0]
    evals = [r for r in history if "eval_reward" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, rewards = [r["step"] for r in train], [r["reward"] for r in train]
        ax.plot(steps, rewards, color="tab:blue", alpha=0.3, label="train reward (batch)")
        k = max(1, len(rewards) // 15)
        smooth = [sum(rewards[max(0, i - k + 1):i + 1]) / len(rewards[max(0, i - k + 1):i + 1])
                  for i in range(len(rewards))]
        ax.plot(steps, smooth, color="tab:blue", label=f"train reward (mean of {k})")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_reward"] for r in evals], "o-", color="tab:orange",
                label="held-out reward (sampled)")
        ax.plot([r["step"] for r in evals], [r["eval_greedy"] for r in evals], "s--", color="tab:green",
                label="held-out reward (greedy)")
    target = next((r for r in history if "teacher_eval_reward" in r), None)
    if target is not None:                  # opd, kd: the teacher's held-out reward is the target
        ax.axhline(target["teacher_eval_reward"], color="tab:orange", ls=":", lw=2, label="teacher, held-out (sampled)")
        ax.axhline(target["teacher_eval_greedy"], color="tab:green", ls=":", lw=2, label="teacher, held-out (greedy)")
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", ncol=1 if target is None else 2, fontsize=None if target is None else "small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
