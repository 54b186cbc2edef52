"""DPO loss and gradients against a direct, scalar implementation of the formula."""

from __future__ import annotations

import math

import pytest
import torch

from etokit.train.dpo_loss import DPOLoss, dpo_loss, dpo_metrics


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


CASE = dict(
    pc=[-10.0, -3.0, -7.5],
    pr=[-12.0, -1.0, -7.5],
    rc=[-11.0, -2.0, -8.0],
    rr=[-11.5, -2.5, -8.0],
)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_and_gradients_match_formula(beta):
    pc = torch.tensor(CASE["pc"], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor(CASE["pr"], dtype=torch.float64, requires_grad=True)
    rc = torch.tensor(CASE["rc"], dtype=torch.float64)
    rr = torch.tensor(CASE["rr"], dtype=torch.float64)
    out = dpo_loss(pc, pr, rc, rr, beta=beta)
    out.losses.sum().backward()
    for i in range(3):
        z = beta * ((CASE["pc"][i] - CASE["rc"][i]) - (CASE["pr"][i] - CASE["rr"][i]))
        assert out.losses[i].item() == pytest.approx(-math.log(_sigmoid(z)), rel=1e-12)
        # d/dpc of -log sigmoid(z) = -beta * (1 - sigmoid(z)); d/dpr is its negation.
        assert pc.grad[i].item() == pytest.approx(-beta * (1 - _sigmoid(z)), rel=1e-12)
        assert pr.grad[i].item() == pytest.approx(beta * (1 - _sigmoid(z)), rel=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (CASE["pc"][i] - CASE["rc"][i]))
        assert out.rejected_rewards[i].item() == pytest.approx(beta * (CASE["pr"][i] - CASE["rr"][i]))
    # pair 0: chosen gains more than rejected -> correct; pair 1: wrong; pair 2: tie (not a win)
    assert out.accuracies.tolist() == [1.0, 0.0, 0.0]
    assert torch.allclose(out.margins, out.chosen_rewards - out.rejected_rewards)
    assert not out.chosen_rewards.requires_grad


def test_reference_gets_no_gradient_and_module_matches_function():
    pc = torch.tensor(CASE["pc"], requires_grad=True)
    pr = torch.tensor(CASE["pr"], requires_grad=True)
    rc = torch.tensor(CASE["rc"], requires_grad=True)
    rr = torch.tensor(CASE["rr"], requires_grad=True)
    out = DPOLoss(beta=0.3)(pc, pr, rc, rr)
    out.losses.mean().backward()
    assert rc.grad is None and rr.grad is None
    assert torch.equal(out.losses, dpo_loss(pc, pr, rc, rr, beta=0.3).losses)


def test_policy_equal_to_reference_gives_log2():
    x = torch.randn(5)
    y = torch.randn(5)
    out = dpo_loss(x, y, x.clone(), y.clone(), beta=0.1)
    assert torch.allclose(out.losses, torch.full((5,), math.log(2.0)))


def test_metrics_are_sums():
    pc, pr = torch.tensor(CASE["pc"]), torch.tensor(CASE["pr"])
    out = dpo_loss(pc, pr, torch.tensor(CASE["rc"]), torch.tensor(CASE["rr"]), beta=0.5)
    m = dpo_metrics(out, pc, pr)
    assert m["loss"].item() == pytest.approx(out.losses.sum().item())
    assert m["rewards/accuracies"].item() == 1.0
    assert m["logps/chosen"].item() == pytest.approx(sum(CASE["pc"]))


def test_bad_inputs():
    t = torch.zeros(3)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(t, t, t, t, beta=0.0)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(t, torch.zeros(2), t, t)
    with pytest.raises(ValueError, match="beta"):
        DPOLoss(beta=float("nan"))
