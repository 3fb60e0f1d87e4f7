"""The memory model of scripts/bench_memory.py: its weights against instantiated models, its largest cohort against
the budget, and one measured client step against its prediction."""
from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from scripts.bench_memory import (GPU_MODELS, Shapes, Workload, adapter_params, gpu_budget, largest_cohort, measure,
                                  model_storages, predict, weight_bytes)

pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(tied: bool) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("tied", [True, False])
def test_weights_and_adapters_are_the_bytes_of_an_instantiated_model(tied):
    """Prepare: a random LLaMA (GQA, tied or not). Execute: the model's byte count from its shapes. Assert: equal to
    the bytes of the model's own storages (parameters and buffers, each once), and the adapter's values to those
    LoRA injects on q_proj and v_proj."""
    from celora.adapters import AdapterConfig, inject

    lm = _llama(tied)
    shapes = Shapes.of(lm.config)
    assert weight_bytes(shapes) == sum(model_storages(lm).values())
    inject(lm, AdapterConfig(r=4), ["q_proj", "v_proj"], seed=0)
    lora = sum(p.numel() for n, p in lm.named_parameters() if "lora_" in n)
    assert adapter_params(shapes, 4, ("q_proj", "v_proj")) == lora


def test_nf4_weights_are_the_bytes_bitsandbytes_holds():
    """A 4-bit model as celora loads it: packed weights, 8-bit absmax, fp32 second-level absmax, offset and codes."""
    from celora.models.llm import tiny_llama

    lm = tiny_llama(hidden_size=64, intermediate_size=128, quantize="nf4").lm
    assert weight_bytes(Shapes.of(lm.config), "nf4") == sum(model_storages(lm).values())


def test_the_largest_cohort_fits_and_one_more_does_not():
    """For every GPU model and option: predict(K) <= budget < predict(K + 1); the prediction grows with K; a larger
    budget never fits fewer clients; checkpointing and nf4 never fit fewer."""
    budget = gpu_budget(80, 1, 0.1)
    for shapes in GPU_MODELS.values():
        for quantize in (None, "nf4"):
            for ckpt in (False, True):
                w = Workload(rows=4, seq=512, answers=128, quantize=quantize, checkpointing=ckpt, dtype_bytes=2)
                k = largest_cohort(shapes, w, budget)
                assert k >= 1
                total = lambda n: predict(shapes, replace(w, clients=n))["total"]  # noqa: E731
                assert total(k) <= budget < total(k + 1)
                assert all(total(n) < total(n + 1) for n in range(1, k + 1))
                assert largest_cohort(shapes, w, 2 * budget) >= k
                assert largest_cohort(shapes, replace(w, checkpointing=True), budget) >= k
                assert largest_cohort(shapes, replace(w, quantize="nf4"), budget) >= k
    tiny = Workload(rows=4, seq=512, answers=128, dtype_bytes=2)
    assert largest_cohort(GPU_MODELS["Llama-3.1-8B"], tiny, 1e9) == 0  # 16 GB of weights in 1 GB: none


def test_the_workload_refuses_what_the_model_does_not_cover():
    with pytest.raises(ValueError, match="lm_head"):
        Workload(targets=("q_proj", "lm_head"))
    with pytest.raises(ValueError, match="q_proj, k_proj or v_proj"):
        Workload(targets=("gate_proj",))
    with pytest.raises(ValueError, match="answers"):
        Workload(seq=16, answers=16)


@pytest.mark.parametrize("clients, checkpointing", [(1, False), (2, True)])
def test_a_measured_step_agrees_with_the_model(clients, checkpointing):
    """celora's real local fit (train_local, or train_cohort stacking 2 clients) of a tiny LLaMA, measured in this
    process: the step's peak (weights + every tensor alive at once), its activations at the peak and the tensors
    autograd saves are each the model's within 20% (the documented check; the derivation gives them to ~1%)."""
    measured = measure("tiny_llama", clients, checkpointing, None, rows=2, seq=32, answers=4,
                       sizes={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2})
    w = Workload(rows=2, seq=32, answers=4, clients=clients, checkpointing=checkpointing)
    predicted = predict(Shapes(**measured["shapes"]), w)
    for key in ("weights", "adapters", "grads", "optimizer"):
        assert predicted[key] == measured[key], key
    for key in ("total", "activations", "saved"):
        assert predicted[key] / measured[key] == pytest.approx(1, abs=0.2), key
    assert torch.get_num_threads() == 1
