"""Group-relative advantages: each sample's reward against the other samples of the same prompt.

GRPO, DAPO, GSPO and CISPO score every completion against its group (the ``G`` samples of one prompt):

- ``normalize=True`` (GRPO): ``A_i = (r_i - mean_g r) / (std_g r + eps)``, the population std of the group;
- ``normalize=False`` (Dr. GRPO): ``A_i = r_i - mean_g r``;
- ``leave_one_out=True`` (RLOO): the baseline of sample ``i`` is the mean of the *other* ``G - 1`` samples,
  ``r_i - mean_{j != i} r_j = G / (G - 1) (r_i - mean_g r)``, an unbiased baseline; with ``normalize=True`` the
  result is then divided by the group's std as above.

A group whose rewards are all equal gets advantages 0 (nothing to learn from it). A non-finite reward makes its
whole group non-finite, so a broken reward function shows up in the loss instead of vanishing in an average.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch

__all__ = ["group_advantages"]


def group_advantages(rewards: torch.Tensor, group_size: Optional[int] = None, *, normalize: bool = True,
                     leave_one_out: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Advantages of ``rewards`` relative to their group.

    Args:
        rewards: ``[B]`` with ``group_size`` consecutive samples per prompt (``B = P * group_size``), or ``[P, G]``
            one prompt per row when ``group_size`` is ``None``. Integer or bool rewards are read as float32.
        group_size: samples per prompt for a 1-d ``rewards``; ``None`` for the ``[P, G]`` layout.
        normalize: divide by the group's (population) standard deviation plus ``eps``.
        leave_one_out: the baseline of each sample is the mean of the other samples of its group (needs
            ``G >= 2``).
        eps: added to the std before dividing (a flat group then gives 0, not NaN).

    Returns:
        advantages with the shape of ``rewards`` (floating; the rewards' dtype when it is floating).
    """
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.is_complex():
        raise TypeError(f"rewards must be real, got {rewards.dtype}")
    r = rewards if rewards.is_floating_point() else rewards.to(torch.float32)
    if group_size is None:
        if r.dim() != 2:
            raise ValueError(f"rewards must be [P, G] when group_size is None, got shape {tuple(r.shape)}; pass "
                             "group_size for a flat [B] batch")
        groups = r
    else:
        if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if r.dim() != 1 or r.shape[0] % group_size:
            raise ValueError(f"rewards must be [B] with B a multiple of group_size = {group_size}, got shape "
                             f"{tuple(r.shape)}")
        groups = r.view(-1, int(group_size))                                        # [P, G]
    g = groups.shape[1]
    if leave_one_out and g < 2:
        raise ValueError(f"leave_one_out needs at least 2 samples per group, got {g}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    centered = groups - groups.mean(dim=1, keepdim=True)                            # [P, G]
    adv = centered * (g / (g - 1)) if leave_one_out else centered
    if normalize:
        adv = adv / (groups.std(dim=1, keepdim=True, unbiased=False) + eps)
    return adv.reshape(rewards.shape)
