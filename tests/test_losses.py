"""Training losses: the MC noise floor (discrepancy principle) and alpha balancing against plain MC."""

import pytest
import torch
from torch import nn

from engine.config import LossConfig
from engine.losses import TrainingLoss


class Identity(nn.Module):
    """``model(y, physics) = A^T y`` with the identity physics: MC = mean (x - y)^2, known exactly."""

    def __init__(self):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(()))

    def forward(self, y, physics):
        return y + self.shift


class IdentityPhysics:
    def A(self, x, **kwargs):
        return x

    def A_adjoint(self, y, **kwargs):
        return y


def test_mc_noise_floor_counts_only_the_residual_above_sigma_squared():
    torch.manual_seed(0)
    y = torch.randn(2, 1, 8, 8)
    model, physics = Identity(), IdentityPhysics()
    floor = 0.04  # sigma = 0.2
    loss = TrainingLoss(LossConfig(mode="mc"), noise_floor=floor)
    with torch.no_grad():
        model.shift.fill_(0.1)  # residual 0.01 per entry: below the floor
    below = loss(model, y, physics)
    assert below.terms["mc"].item() == pytest.approx(0.01, rel=1e-5)
    assert below.terms["mc_above_noise"].item() == 0.0 and below.total.item() == 0.0
    below.total.backward()
    assert model.shift.grad is None or model.shift.grad.item() == 0.0  # no pull towards fitting the noise
    with torch.no_grad():
        model.shift.fill_(0.3)  # residual 0.09: 0.05 above the floor
    above = loss(model, y, physics)
    assert above.total.item() == pytest.approx(0.09 - floor, rel=1e-5)
    plain = TrainingLoss(LossConfig(mode="mc"))
    assert "mc_above_noise" not in plain(model, y, physics).terms
    assert plain(model, y, physics).total.item() == pytest.approx(0.09, rel=1e-5)
