"""Sigmoid DPO loss (Rafailov et al., 2023) as ETO uses it: no label smoothing, sequence
log-probs are SUMS over the agent's tokens (see etokit.train.logprobs).

    loss = -log sigmoid( beta * [ (pi_c - ref_c) - (pi_r - ref_r) ] )

Kept as a plain function plus a thin ``nn.Module`` (torchtune's ``DPOLoss`` shape) so the
training loop, the tests and the benchmark all call the exact same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DPOOutput:
    """Per-pair loss and the statistics DPO runs are judged by (all shape ``[num_pairs]``).

    ``chosen_rewards`` / ``rejected_rewards`` are the implicit rewards
    ``beta * (log pi - log ref)``; they carry no gradient.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracies(self) -> torch.Tensor:
        # Strictly greater: a tie (e.g. step 0, policy == reference) is not a win.
        return (self.chosen_rewards > self.rejected_rewards).float()


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> DPOOutput:
    """Per-pair sigmoid DPO losses. Inputs are ``[num_pairs]`` sequence log-probs.

    Reduction is left to the caller: the training loop divides the *sum* by the global number
    of pairs in the optimizer step, which keeps gradient accumulation and multi-process runs
    equal to one big batch.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    shapes = {t.shape for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1:
        raise ValueError(f"DPO inputs must share one shape, got {sorted(map(tuple, shapes))}")
    # The reference is a constant of the objective; detaching guards against a reference computed
    # by the same module (LoRA with adapters disabled) leaking gradient.
    ref_chosen_logps = ref_chosen_logps.detach().to(policy_chosen_logps.dtype)
    ref_rejected_logps = ref_rejected_logps.detach().to(policy_rejected_logps.dtype)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return DPOOutput(
        losses=losses,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
    )


class DPOLoss(nn.Module):
    """``DPOLoss(beta)(pc, pr, rc, rr) -> DPOOutput``; the module form for recipes."""

    def __init__(self, beta: float = 0.1):
        super().__init__()
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.beta = beta

    def forward(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps) -> DPOOutput:
        return dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


def dpo_metrics(
    out: DPOOutput, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Sums (not means) of the logged statistics, so they can be reduced across micro-batches and
    processes and divided once by the global pair count."""
    return {
        "loss": out.losses.detach().sum(),
        "rewards/chosen": out.chosen_rewards.sum(),
        "rewards/rejected": out.rejected_rewards.sum(),
        "rewards/margins": out.margins.sum(),
        "rewards/accuracies": out.accuracies.sum(),
        "logps/chosen": policy_chosen_logps.detach().sum(),
        "logps/rejected": policy_rejected_logps.detach().sum(),
    }
