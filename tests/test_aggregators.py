"""FedAvg is an example-weighted mean, pure and exact (Prepare / Execute / Assert)."""
import pytest
import torch

from celora.fl.aggregators import Centralized, FedAvg, Local, weighted_average


def _state(v):
    return {"a": torch.full((2, 3), float(v)), "b": torch.tensor([v, 2.0 * v])}


def test_fedavg_is_example_weighted_mean():
    uploads = {0: _state(1.0), 3: _state(4.0)}
    sizes = {0: 30, 3: 10}
    out = FedAvg()(uploads, sizes).global_state
    expected = (30 * 1.0 + 10 * 4.0) / 40
    # exact: weights 3/4 and 1/4 and these values are all binary fractions, so no step rounds
    assert torch.equal(out["a"], torch.full((2, 3), expected))
    assert torch.equal(out["b"], torch.tensor([expected, 2 * expected]))


def test_fedavg_of_identical_inputs_is_the_input_and_inputs_are_untouched():
    s = {"w": torch.randn(4, 4)}
    before = s["w"].clone()
    out = FedAvg()({1: s, 2: {"w": s["w"].clone()}}, {1: 7, 2: 3}).global_state
    # exact: the mean is accumulated in float64, within gamma(3) = 3.3e-16 of w relatively, far inside
    # half a float32 spacing (6e-8 relatively), so rounding back to float32 returns w itself
    assert torch.equal(out["w"], before)
    assert torch.equal(s["w"], before)


def test_fedavg_ignores_client_order():
    g = torch.Generator().manual_seed(0)
    ups = {i: {"w": torch.randn(3, generator=g)} for i in range(5)}
    sizes = {i: i + 1 for i in range(5)}
    a = FedAvg()(ups, sizes).global_state["w"]
    b = FedAvg()(dict(reversed(list(ups.items()))), sizes).global_state["w"]
    assert torch.equal(a, b)


def test_weighted_average_rejects_bad_weights():
    with pytest.raises(ValueError, match="one weight per state"):
        weighted_average([_state(1)], [1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        weighted_average([_state(1), _state(2)], [-1, 2])


def test_reference_modes_are_declared_as_data():
    assert FedAvg.communicates and not FedAvg.pooled
    assert not Local.communicates and not Local.pooled
    assert not Centralized.communicates and Centralized.pooled
