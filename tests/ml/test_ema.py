"""The moving average of weights shared by the classifier and the detector."""

from __future__ import annotations

import pytest
import torch

from cellspot.ml.common import ema_model


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))


def test_zero_decay_means_no_average() -> None:
    assert ema_model(_net(), 0.0) is None


def test_first_update_copies_then_the_average_lags_with_a_warming_decay() -> None:
    net = _net()
    ema = ema_model(net, 0.99)
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    ema.update_parameters(net)
    assert torch.equal(ema.module[0].weight, net[0].weight)  # n = 0: a copy
    with torch.no_grad():
        net[0].weight.fill_(3.0)
    ema.update_parameters(net)  # n = 1: decay min(0.99, 2 / 11)
    d = 2.0 / 11.0
    assert ema.module[0].weight.flatten()[0].item() == pytest.approx(d * 1.0 + (1 - d) * 3.0)
    for _ in range(2000):
        ema.update_parameters(net)
    assert ema.module[0].weight.flatten()[0].item() == pytest.approx(3.0, abs=1e-6)


def test_batch_norm_statistics_are_averaged_and_counters_copied() -> None:
    net = _net()
    ema = ema_model(net, 0.5)
    net.train()
    net(torch.randn(4, 1, 8, 8) * 5 + 2)
    ema.update_parameters(net)
    assert torch.equal(ema.module[1].running_mean, net[1].running_mean)
    assert int(ema.module[1].num_batches_tracked) == int(net[1].num_batches_tracked) == 1
