"""The expert's weight average (`chatvla train --stage2-ema`): the update rule, and the round trip an
interrupted run needs."""

from __future__ import annotations

import pytest
import torch

from chatvla.training.averaging import WeightAverage


def _linear(value: float) -> torch.nn.Linear:
    m = torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(value)
    return m


def test_the_average_starts_at_the_weights_and_warms_up_before_it_keeps_decay():
    m = _linear(0.0)
    average = WeightAverage(m, 0.99)
    assert torch.equal(average.shadow["weight"], torch.zeros(2, 3))
    assert average.rate() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): the first update mostly takes the weights
    with torch.no_grad():
        m.weight.fill_(1.0)
    average.update(m)
    torch.testing.assert_close(average.shadow["weight"], torch.full((2, 3), 0.9))
    average.updates = 10_000
    assert average.rate() == 0.99


def test_a_constant_weight_is_its_own_average_and_a_noisy_one_averages_out():
    m = _linear(2.0)
    average = WeightAverage(m, 0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        with torch.no_grad():
            m.weight.copy_(2.0 + torch.randn(2, 3, generator=gen))
        average.update(m)
    torch.testing.assert_close(average.shadow["bias"], torch.full((2,), 2.0))
    noise_left = (average.shadow["weight"] - 2.0).abs().max().item()
    assert noise_left < 0.6 < (m.weight - 2.0).abs().max().item()
    average.copy_to(m)
    assert torch.equal(m.weight, average.shadow["weight"])


def test_the_average_round_trips_with_its_update_count_and_refuses_another_modules(tmp_path):
    m = _linear(1.0)
    average = WeightAverage(m, 0.95)
    for _ in range(3):
        with torch.no_grad():
            m.weight.add_(1.0)
        average.update(m)
    average.save(tmp_path / "avg.safetensors")
    again = WeightAverage(_linear(0.0), 0.95)
    again.load(tmp_path / "avg.safetensors")
    assert again.updates == 3 and again.rate() == average.rate()
    assert all(torch.equal(again.shadow[k], v) for k, v in average.shadow.items())
    with pytest.raises(ValueError, match="other parameters"):
        WeightAverage(torch.nn.Linear(4, 2), 0.95).load(tmp_path / "avg.safetensors")
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(m, 1.0)
