"""Bytes on the wire equal the hand formula of METHOD.md section 4, for every adapter and head policy."""
import copy
import dataclasses

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from celora.adapters import inject
from celora.fl.wire import Exchange, Payload, wire_dtype
from conftest import CONF_DIR

HIDDEN, LAYERS, R, CLASSES = 384, 6, 8, 2  # MiniLM-L6, adapters on query and value
MODULES = 2 * LAYERS
HEAD = HIDDEN * CLASSES + CLASSES
# values uploaded per client per round, by hand (head local): e.g. lora 12 x 8 x (384 + 384) = 73,728
BY_HAND = {
    "lora": MODULES * R * (HIDDEN + HIDDEN),
    "ffa_lora": MODULES * HIDDEN * R,  # B only: d_out x r
    "fedsa_lora": MODULES * R * HIDDEN,  # A only: r x d_in
    "tri": MODULES * R * R,  # 12 x 8 x 8 = 768
}


class _Fresh:
    """Loads MiniLM once; each classifier gets its own copy (injection edits the backbone in place)."""

    def __init__(self):
        from celora.models.text import minilm

        self.spec = minilm()
        self.default_targets = self.spec.default_targets

    def classifier(self, classes, seed):
        return dataclasses.replace(self.spec, backbone=copy.deepcopy(self.spec.backbone)).classifier(classes, seed)


@pytest.fixture(scope="module")
def minilm():
    return _Fresh()


def _adapter(name, **overrides):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"adapter={name}"] + [f"adapter.{k}={v}" for k, v in overrides.items()])
    return instantiate(cfg.adapter)


@pytest.mark.parametrize("name", sorted(BY_HAND))
@pytest.mark.parametrize("head", ["local", "shared"])
def test_uplink_values_match_hand_formula(minilm, name, head):
    adapter = _adapter(name, head=head)
    model = minilm.classifier(CLASSES, seed=0)
    inject(model, adapter, minilm.default_targets, seed=1)
    ex = Exchange.of(model, adapter)
    state = dict(model.named_parameters())
    up = Payload.pack(state, ex.shared, torch.float32)
    expected = BY_HAND[name] + (HEAD if head == "shared" else 0)
    assert up.numel == expected
    assert up.nbytes == 4 * expected
    # half precision on the wire halves the bytes, and unpacks to the same shapes
    half = Payload.pack(state, ex.shared, wire_dtype("bf16"))
    assert half.nbytes * 2 == up.nbytes
    assert {k: v.shape for k, v in half.unpack().items()} == {k: v.shape for k, v in up.unpack().items()}


def test_tri_sends_only_c_and_fedsa_never_sends_b(minilm):
    for name, sent, kept in [("tri", "lora_C", ()), ("fedsa_lora", "lora_A", ("lora_B",))]:
        adapter = _adapter(name, head="local")
        model = minilm.classifier(CLASSES, seed=0)
        inject(model, adapter, minilm.default_targets, seed=1)
        ex = Exchange.of(model, adapter)
        assert ex.shared and all(n.endswith(sent) for n in ex.shared)
        assert all(n.endswith(kept + ("head.weight", "head.bias")) for n in ex.private)
        assert not any(n.endswith("lora_B") for n in ex.shared)


def test_no_communication_means_nothing_shared(minilm):
    adapter = _adapter("lora")
    model = minilm.classifier(CLASSES, seed=0)
    inject(model, adapter, minilm.default_targets, seed=1)
    ex = Exchange.of(model, adapter, communicates=False)
    assert ex.shared == ()
    assert len(ex.private) == 2 * MODULES + 2
    assert Payload.pack(dict(model.named_parameters()), ex.shared, torch.float32).nbytes == 0


def test_unknown_wire_dtype_is_named():
    with pytest.raises(ValueError, match="fl.wire_dtype"):
        wire_dtype("fp8")
