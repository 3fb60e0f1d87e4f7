"""Peak memory of one client's local step, and of a stacked cohort of K, with and without gradient checkpointing and
4-bit weights: measured on the CPU (each setting in its own process) against an analytic model computed from the
shapes alone; then the model's largest cohort that fits a GPU for SmolLM2-135M, Llama-3.2-1B and Llama-3.1-8B.

    .venv/bin/python -m scripts.bench_memory                              # the measured table and the K table
    .venv/bin/python -m scripts.bench_memory --models tiny_llama --cohorts 1 4 --out /tmp/memory.md
    .venv/bin/python -m scripts.bench_memory --predict-only               # the K table alone, nothing measured

The peak memory of one client step is the most tensor memory alive at once during a local step that already has
its optimiser state (the second step of a fit; the first, on one short row per client, only creates AdamW's state):
the model's weights (parameters, buffers, a quantized layer's packed weight and its quantization state), the
adapter factors (K stacked copies in a cohort, beside the model's own), AdamW's two moments, and the activations at
their peak: what autograd keeps for the backward pass plus the working set on top of it where that is largest (the
loss's backward, or the last layer's MLP backward after its recomputation with checkpointing). The model adds the
gradients whole, a bound from above: in a step of one batch they do not exist yet at either moment, but with
client.grad_accum > 1 the earlier batches' gradients are alive through the later ones. On a GPU it is what
torch.cuda.max_memory_allocated reports for the step. On the CPU it is measured as the model's bytes before the
step plus the peak, over the fit, of the bytes of every tensor storage allocated during it and not yet freed
(tracked at the dispatcher, storage by storage); the activations autograd keeps are measured beside it with
torch.autograd.graph.saved_tensors_hooks, and the process's peak RSS increase over the step is reported as the
whole-process view (what the C allocator held, not only tensors).

The model (`predict`) takes a LLaMA decoder's shapes and a workload (rows x tokens per client, answer tokens per
row, K, rank, targets, checkpointing, quantization, the weights' dtype) and nothing measured: every constant comes
from the operations of transformers' LlamaDecoderLayer, celora's adapter layer and the instruct loss (docs/parallel.md,
"Memory").
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
MB = 1e6
FP32 = 4  # the adapter factors, their gradients and AdamW's moments; RMSNorm statistics; the loss's logits

# ---------------------------------------------------------------- the analytic model (pure functions of shapes)


@dataclass(frozen=True)
class Shapes:
    """A LLaMA decoder's sizes: all its memory depends on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = True  # lm_head shares the input embedding's weight

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """One decoder layer's linear maps: name -> (d_in, d_out)."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @classmethod
    def of(cls, config) -> Shapes:
        """From a transformers LlamaConfig."""
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.num_attention_heads,
                   config.num_key_value_heads, config.vocab_size, bool(config.tie_word_embeddings))


# Shapes of the three models of the K table (their Hugging Face configs).
SMOLLM2_135M = Shapes(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49_152)
LLAMA_32_1B = Shapes(layers=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8, vocab=128_256)
LLAMA_31_8B = Shapes(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128_256, tied=False)
GPU_MODELS = {"SmolLM2-135M": SMOLLM2_135M, "Llama-3.2-1B": LLAMA_32_1B, "Llama-3.1-8B": LLAMA_31_8B}

# Which tensor an adapter on each linear map reads: maps reading the same tensor share it when nothing is cast.
INPUT_OF = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
            "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid"}


@dataclass(frozen=True)
class Workload:
    """One local step: each of K clients brings `rows` rows of `seq` tokens, `answers` of each row's positions
    scored (instruct: the vocabulary logits are computed there only); LoRA rank r on `targets`."""

    rows: int = 4
    seq: int = 128
    answers: int = 8
    clients: int = 1  # K: 1 trains on the model's own factors (sequential), K > 1 stacks them (parallel)
    r: int = 8
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    checkpointing: bool = False
    quantize: str | None = None  # None | nf4 | int8
    dtype_bytes: int = 4  # the backbone's weights and activations: 4 (fp32) or 2 (bf16)

    def __post_init__(self):
        unknown = set(self.targets) - set(INPUT_OF)
        if unknown:
            raise ValueError(f"targets {sorted(unknown)}: the model knows LLaMA's {sorted(INPUT_OF)}")
        if not {"q_proj", "k_proj", "v_proj"} & set(self.targets):
            # layer 0's attention then needs no gradient, which the per-layer terms below do not cover
            raise ValueError("the model assumes an adapter on q_proj, k_proj or v_proj")
        if not 1 <= self.answers < self.seq:
            raise ValueError(f"answers={self.answers} must be in [1, seq - 1 = {self.seq - 1}]")
        if self.quantize not in (None, "nf4", "int8"):
            raise ValueError(f"quantize={self.quantize!r}: None, nf4 or int8")

    @property
    def tokens(self) -> int:  # N: the cohort's tokens in one batch
        return self.clients * self.rows * self.seq

    @property
    def answer_tokens(self) -> int:  # n: positions whose vocabulary logits are computed
        return self.clients * self.rows * self.answers

    @property
    def stacked(self) -> bool:
        return self.clients > 1


def quantized_bytes(d_in: int, d_out: int, quantize: str | None, dtype_bytes: int) -> int:
    """Bytes of one frozen linear weight (no bias in LLaMA) as bitsandbytes holds it.

    nf4 with double quantization (QLoRA; celora's BitsAndBytesConfig): 4 bits a weight, one 8-bit absmax per block
    of 64 weights, one fp32 absmax per 256 of those blocks (rounded up), one fp32 offset, and the matrix's own copies
    of the 16-value NF4 code and the 256-value code of the absmax quantization (fp32). int8 (LLM.int8()): one byte a
    weight and an fp32 scale per output row."""
    n = d_in * d_out
    if quantize is None:
        return n * dtype_bytes
    if quantize == "nf4":
        blocks = math.ceil(n / 64)
        return math.ceil(n / 2) + blocks + math.ceil(blocks / 256) * FP32 + FP32 + (16 + 256) * FP32
    return n + d_out * FP32


def weight_bytes(shapes: Shapes, quantize: str | None = None, dtype_bytes: int = 4) -> int:
    """The frozen backbone: embedding (and an untied lm_head), RMSNorm weights, RoPE's inverse frequencies (two
    buffers, inv_freq and original_inv_freq, head_dim / 2 each, cast with the model), and every decoder layer's
    seven linear maps (quantized when asked; embeddings and norms never are)."""
    embed = shapes.vocab * shapes.hidden * dtype_bytes * (1 if shapes.tied else 2)
    norms = (2 * shapes.layers + 1) * shapes.hidden * dtype_bytes
    rope = 2 * (shapes.head_dim // 2) * dtype_bytes
    linear = sum(quantized_bytes(d_in, d_out, quantize, dtype_bytes) for d_in, d_out in shapes.linears().values())
    return embed + norms + rope + shapes.layers * linear


def adapter_params(shapes: Shapes, r: int, targets=("q_proj", "v_proj")) -> int:
    """One client's trainable values: LoRA's A (r x d_in) and B (d_out x r) on every target of every layer."""
    sizes = shapes.linears()
    return shapes.layers * sum(r * (d_in + d_out) for name, (d_in, d_out) in sizes.items() if name in targets)


def layer_tensors(shapes: Shapes, w: Workload, first: bool = False) -> dict[str, int]:
    """What autograd keeps of one decoder layer, per token: tensor -> bytes (b: the backbone's bytes per value).

    - Each RMSNorm keeps its input in fp32 (x.pow(2) and x * rsqrt(...) save it; in bf16 that is an fp32 copy)
      and the rsqrt, one fp32 value; its weight's product keeps only the weight. Layer 0's input (the embedding)
      needs no gradient, so its first norm keeps nothing.
    - A frozen linear map keeps nothing of its input (its input gradient needs only the weight). An adapter's
      A x keeps its input in fp32 (for A's gradient), and B (A x) keeps A x (r values, for B's); adapters reading
      one tensor share it in fp32, while in bf16 each casts its own fp32 copy.
    - Attention (SDPA's flash or efficient kernel; GQA without repeating K and V when no padding mask is passed)
      keeps q (hidden), k and v (kv_dim each), its output (hidden) and the log-sum-exp (one fp32 per head). The
      kernels allocate the output as (batch, seq, heads, head_dim), so o_proj's input is that same tensor.
    - The MLP keeps gate's output, its SiLU and up's output (3 x intermediate); down_proj keeps nothing.
    """
    h, i, b = shapes.hidden, shapes.intermediate, w.dtype_bytes
    fp32 = lambda name: name if b == FP32 else f"{name}_fp32"  # noqa: E731  (an fp32 value: itself, or a copy)
    kept = {} if first else {fp32("x"): h * FP32, "rsqrt_1": FP32}
    kept.update({"q": h * b, "k": shapes.kv_dim * b, "v": shapes.kv_dim * b, "attn_out": h * b,
                 "lse": shapes.heads * FP32, fp32("h1"): h * FP32, "rsqrt_2": FP32,
                 "gate": i * b, "silu": i * b, "up": i * b})
    for target in w.targets:
        source = INPUT_OF[target]
        kept[source if b == FP32 else f"{target}_fp32"] = _width(shapes)[source] * FP32
        kept[f"{target}_Ax"] = w.r * FP32
    return kept


def _width(shapes: Shapes) -> dict[str, int]:
    return {"attn_in": shapes.hidden, "attn_out": shapes.hidden, "mlp_in": shapes.hidden,
            "mlp_mid": shapes.intermediate}


def int8_inputs(shapes: Shapes, w: Workload, first: bool = False) -> dict[str, int]:
    """What an int8 layer keeps beside autograd's saved tensors, per token: bitsandbytes' int8 autograd functions
    hold their input as an attribute of the context (`ctx.A`) whenever it needs a gradient (layer 0's q, k and v
    inputs do not), so checkpointing cannot drop it. Names shared with `layer_tensors` are the same tensors."""
    if w.quantize != "int8":
        return {}
    return {s: n * w.dtype_bytes for s, n in _width(shapes).items() if not (first and s == "attn_in")}


def activation_bytes(shapes: Shapes, w: Workload) -> dict[str, int]:
    """What autograd saves for the backward pass (`saved`: what saved_tensors_hooks see) and the most alive at
    once (`peak`), in bytes.

    Per layer and token: `layer_tensors`, and `int8_inputs` beside them. RoPE keeps cos and sin once per step
    (seq x head_dim each, in b). The final RMSNorm keeps its fp32 input and rsqrt. The loss keeps the fp32
    log-softmax of the answer positions' logits (vocab values each; celora computes logits only there), their
    targets and row indices (int64) and a float per answer token, and the answer mask (one byte per position).
    With checkpointing a layer keeps only its input (hidden values in b; RoPE's cos and sin are then held by the
    checkpoint's closure, not saved), and its activations live again while its backward runs, one layer at a time
    (an fp32 layer's first norm then keeps that same input).

    The peak is the larger of two moments: the loss's backward, when the log-softmax's incoming gradient and the
    logits' gradient (2 x vocab fp32 values per answer token) join everything saved; and the last layer's MLP
    backward (after its recomputation with checkpointing), when the loss and the final norm are freed and the
    hidden state's gradient (hidden values) and either the SiLU product's three gradients (3 x intermediate) or
    down_proj's input gradient (intermediate) with its dequantized weight (a quantized layer) join."""
    h, i, b = shapes.hidden, shapes.intermediate, w.dtype_bytes
    n_tokens, n_answers = w.tokens, w.answer_tokens
    saved_of = {first: layer_tensors(shapes, w, first) for first in (True, False)}
    held_of = {first: int8_inputs(shapes, w, first) for first in (True, False)}
    rope = 2 * w.seq * shapes.head_dim * b
    loss = n_answers * (shapes.vocab * FP32 + 8 + 8 + FP32) + w.clients * w.rows * (w.seq - 1) + 3 * FP32
    if w.checkpointing:  # a layer keeps its input (and an int8 layer's inputs); its saved tensors come back in turn
        saved_layers = n_tokens * shapes.layers * h * b
        held = n_tokens * (sum(held_of[True].values()) + (shapes.layers - 1) * sum(held_of[False].values()))
        recomputed = n_tokens * (sum(saved_of[False].values()) - (h * FP32 if b == FP32 else 0))
    else:
        per_layer = {first: sum({**saved_of[first], **held_of[first]}.values()) for first in (True, False)}
        both = n_tokens * (per_layer[True] + (shapes.layers - 1) * per_layer[False])
        saved_layers = n_tokens * (sum(saved_of[True].values()) + (shapes.layers - 1) * sum(saved_of[False].values()))
        held, recomputed = both - saved_layers, 0
    final = n_tokens * (h * FP32 + FP32)
    saved = saved_layers + rope + final + loss
    at_loss = saved + held + 2 * n_answers * shapes.vocab * FP32
    dequantized = i * h * b if w.quantize else 0
    mlp_backward = max(3 * n_tokens * i * b, n_tokens * i * b + dequantized)
    at_last_layer = saved_layers + held + rope + recomputed + n_tokens * h * b + mlp_backward
    return {"saved": saved, "peak": max(at_loss, at_last_layer), "at_loss": at_loss, "at_last_layer": at_last_layer}


def predict(shapes: Shapes, w: Workload) -> dict[str, int]:
    """The step's peak memory by component (bytes): frozen weights, adapter factors (the model's own plus K stacked
    copies in a cohort), their gradients, AdamW's exp_avg and exp_avg_sq (and its step counter, one fp32 per
    tensor), and the activations' peak; `total` is their sum."""
    per_client = adapter_params(shapes, w.r, w.targets)
    tensors = 2 * shapes.layers * len(w.targets)
    copies = 1 + w.clients if w.stacked else 1
    act = activation_bytes(shapes, w)
    out = {
        "weights": weight_bytes(shapes, w.quantize, w.dtype_bytes),
        "adapters": copies * per_client * FP32,
        "grads": w.clients * per_client * FP32,
        "optimizer": 2 * w.clients * per_client * FP32 + tensors * FP32,
        "saved": act["saved"],
        "activations": act["peak"],
    }
    out["total"] = out["weights"] + out["adapters"] + out["grads"] + out["optimizer"] + out["activations"]
    return out


def largest_cohort(shapes: Shapes, w: Workload, budget: float, limit: int = 1 << 20) -> int:
    """The largest K whose predicted step fits in `budget` bytes (0 if one client does not). The prediction grows
    with K (every per-client term is non-negative), so a bisection finds it."""
    fits = lambda k: predict(shapes, replace(w, clients=k))["total"] <= budget  # noqa: E731
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def gpu_budget(gpu_gb: float, context_gb: float, margin: float) -> float:
    """Bytes the model may plan for on a GPU of gpu_gb (decimal GB): the CUDA context off, then a margin for
    the allocator's fragmentation and what the model leaves out."""
    return (gpu_gb - context_gb) * 1e9 * (1 - margin)


# ---------------------------------------------------------------- measuring one setting (in its own process)


def _storages(tensors) -> dict[int, int]:
    """data_ptr -> bytes of each distinct storage among the tensors."""
    out = {}
    for t in tensors:
        st = t.untyped_storage()
        if st.nbytes():
            out[st.data_ptr()] = st.nbytes()
    return out


def _quant_state_tensors(state, seen=None):
    """Every tensor a bitsandbytes QuantState holds (absmax, code, offset, and its nested state2's)."""
    import torch

    seen = set() if seen is None else seen
    if state is None or id(state) in seen:
        return []
    seen.add(id(state))
    out = []
    for value in vars(state).values():
        if torch.is_tensor(value):
            out.append(value)
        elif hasattr(value, "__dict__") and type(value).__name__ == "QuantState":
            out += _quant_state_tensors(value, seen)
    return out


def model_storages(model) -> dict[int, int]:
    """Every storage the model holds: parameters, buffers, and quantized layers' states (4-bit QuantState, the
    int8 scales SCB)."""
    import torch

    tensors = list(model.parameters()) + list(model.buffers())
    for p in model.parameters():
        tensors += _quant_state_tensors(getattr(p, "quant_state", None))
        tensors += [v for k in ("SCB", "CB") if torch.is_tensor(v := getattr(p, k, None))]
    return _storages(tensors)


class LiveTensors:
    """The bytes of tensor storages allocated while active and not yet freed, and their peak: the CPU's
    torch.cuda.max_memory_allocated. Every op's outputs are seen at the dispatcher; a storage counts from its
    first appearance until Python's last reference to it is gone (a weakref finalizer)."""

    def __init__(self, exclude: set[int]):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if hasattr(t, "untyped_storage"):
                        st = t.untyped_storage()
                        key, n = st.data_ptr(), st.nbytes()
                        if n and key not in tracker.live and key not in tracker.exclude:
                            tracker.live[key] = n
                            tracker.current += n
                            tracker.peak = max(tracker.peak, tracker.current)
                            weakref.finalize(st, tracker.free, key)
                return out

        self.exclude, self.live, self.current, self.peak = exclude, {}, 0, 0
        self.mode = Mode()

    def free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _reset_rss_peak() -> int:
    """Resets the process's peak RSS (VmHWM) to its current RSS (Linux's clear_refs 5) and returns that."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _rss()[0]
    except OSError as e:
        sys.exit(f"bench_memory measures the peak RSS through /proc/self (Linux): {e}")


def build_client(model: str, sizes: dict, checkpointing: bool, quantize: str | None, dtype: str, r: int):
    """The backbone and its adapted frozen model as a run builds them (celora.world.build_world without the data):
    the config composed by Hydra, checked, the model made, LoRA injected on its default targets."""
    import torch
    from hydra import compose, initialize_config_dir

    from celora import schema
    from celora.adapters import inject
    from celora.fl.client import set_trainable
    from celora.fl.wire import Exchange
    from celora.seeds import FROZEN_FACTORS, derive_seed
    from celora.validate import build

    overrides = [f"model={model}", "task=instruct", "dataset=rt_instruct", "method=lora", "logger=none",
                 f"model.gradient_checkpointing={str(checkpointing).lower()}", f"model.dtype={dtype}",
                 f"model.quantize={quantize or 'null'}", f"adapter.r={r}", "adapter.alpha=16",
                 *[f"+model.{k}={v}" for k, v in sizes.items()]]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    parts = build(cfg)
    torch.manual_seed(cfg.seed)
    backbone = schema.make(cfg.model)
    net = backbone.classifier(0, seed=cfg.seed)
    targets = parts.adapter.targets or backbone.default_targets
    inject(net, parts.adapter, targets, seed=derive_seed(cfg.seed, FROZEN_FACTORS))
    exchange = Exchange.of(net, parts.adapter, parts.aggregator.communicates)
    set_trainable(net, exchange.trainable)
    return backbone, net, exchange, parts, tuple(targets)


def _batch(rows: int, seq: int, answers: int, vocab: int, gen) -> dict:
    """An instruct batch as AnswerCollate makes it for rows of one length: token ids, a full attention mask, and
    targets on the last `answers` positions of each row (IGNORE on the prompt)."""
    import torch

    from celora.data.batches import IGNORE

    ids = torch.randint(0, vocab, (rows, seq), generator=gen)
    labels = torch.full((rows, seq), IGNORE)
    labels[:, seq - answers:] = ids[:, seq - answers:]
    return {"input_ids": ids, "attention_mask": torch.ones(rows, seq, dtype=torch.long), "labels": labels}


def measure(model: str, clients: int, checkpointing: bool, quantize: str | None, rows: int, seq: int, answers: int,
            r: int = 8, dtype: str = "fp32", sizes: dict | None = None) -> dict:
    """Builds the client, then runs celora's real local fit (train_local for K = 1, train_cohort for K > 1) of two
    steps: one short row per client (creates AdamW's state), then the measured step of `rows` x `seq` tokens."""
    import torch

    from celora.fl.client import Fitting, train_cohort, train_local
    from celora.fl.engine import Engine

    backbone, net, exchange, parts, targets = build_client(model, sizes or {}, checkpointing, quantize, dtype, r)
    lm = backbone.lm
    gen = torch.Generator().manual_seed(0)
    vocab = lm.config.vocab_size
    loaders = [[_batch(1, 8, 1, vocab, gen), _batch(rows, seq, answers, vocab, gen)] for _ in range(clients)]
    names = exchange.trainable
    # what each client of a cohort starts from (in a run: what it received), made before the step is measured
    states = [{n: p.detach().clone() for n, p in net.named_parameters() if n in names} for _ in range(clients)]
    held = model_storages(net)
    with torch.no_grad():  # pages of weights mapped from the checkpoint file become resident before the step
        for t in list(net.parameters()) + list(net.buffers()):
            t.sum()
    adapter_own = sum(p.numel() * p.element_size() for n, p in net.named_parameters() if n in names)

    kept, seen = [], {}

    def optimizer(params):
        kept.append(parts.client.optimizer(params))
        return kept[-1]

    def first_backward(m):  # the factors being trained (K stacked copies in a cohort) and their gradients
        params = [p for n, p in m.named_parameters() if n in names]
        seen["trained"] = sum(p.numel() * p.element_size() for p in params)
        seen["grads"] = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)

    saved: dict[int, int] = {}
    exclude: set[int] = set()

    def new_forward(module, args):  # the decoder's forward: a step begins, keep only its saved tensors
        saved.clear()
        exclude.update(model_storages(net))  # the stacked factors exist by now

    def pack(t):
        st = t.untyped_storage()
        if st.nbytes() and st.data_ptr() not in exclude:
            saved[st.data_ptr()] = st.nbytes()
        return t

    lm.get_decoder().register_forward_pre_hook(new_forward)
    fitting = Fitting(task=parts.task, optimizer=optimizer, grad_clip=parts.client.grad_clip,
                      engine=Engine("cpu", "32-true"))
    tracker = LiveTensors(set(held))
    rss_before = _reset_rss_peak()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), tracker:
        if clients == 1:
            train_local(net, names, loaders[0], fitting, first_backward)
        else:
            train_cohort(net, names, states, loaders, [2] * clients, fitting, backbone.collate().pad_id,
                         first_backward)
    seconds = time.perf_counter() - start
    _, rss_peak = _rss()
    state = kept[0].state
    optimizer_bytes = sum(v.numel() * v.element_size() for s in state.values() for v in s.values()
                          if torch.is_tensor(v))
    weights = sum(held.values())
    stacked = seen["trained"] if clients > 1 else 0
    return {
        "weights": weights - adapter_own, "adapters": adapter_own + stacked, "grads": seen["grads"],
        "optimizer": optimizer_bytes, "saved": sum(saved.values()),
        # the activations at the peak: what was alive then, less what the step holds throughout
        "activations": tracker.peak - stacked - optimizer_bytes,
        "total": weights + tracker.peak, "rss": rss_peak - rss_before, "seconds": seconds,
        "shapes": asdict(Shapes.of(lm.config)), "targets": list(targets),
    }


def settled(setting: dict) -> dict:
    """A measured setting with the model's prediction for the same shapes and workload."""
    shapes = Shapes(**setting["shapes"])
    w = Workload(rows=setting["rows"], seq=setting["seq"], answers=setting["answers"], clients=setting["clients"],
                 r=setting.get("r", 8), targets=tuple(setting["targets"]), checkpointing=setting["checkpointing"],
                 quantize=setting["quantize"], dtype_bytes=2 if setting.get("dtype") == "bf16" else 4)
    return {**setting, "predicted": predict(shapes, w)}


def _child(setting: dict) -> dict:
    """Measures one setting in a process of its own (so its peaks are its own)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-m", "scripts.bench_memory", "--one", json.dumps(setting)],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode:
        sys.exit(f"{setting} failed:\n{out.stderr[-3000:]}")
    return settled({**setting, **json.loads(out.stdout.strip().splitlines()[-1])})


# ---------------------------------------------------------------- tables


def _mb(x: float) -> str:
    return f"{x / MB:,.1f}"


def measured_table(results: list[dict]) -> str:
    head = ("| model | dtype | K | ckpt | quant | weights | adapters + grads + AdamW | saved act. meas. / pred. | "
            "act. peak meas. / pred. | ratio | step peak meas. / pred. | ratio | peak RSS incr. |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in results:
        p = s["predicted"]
        small = s["adapters"] + s["grads"] + s["optimizer"]
        lines.append(
            f"| {s['model']} | {s.get('dtype', 'fp32')} | {s['clients']} | {'on' if s['checkpointing'] else 'off'} | "
            f"{s['quantize'] or '-'} | {_mb(s['weights'])} | {_mb(small)} | {_mb(s['saved'])} / {_mb(p['saved'])} | "
            f"{_mb(s['activations'])} / {_mb(p['activations'])} | {p['activations'] / s['activations']:.3f} | "
            f"{_mb(s['total'])} / {_mb(p['total'])} | {p['total'] / s['total']:.3f} | {_mb(s['rss'])} |")
    return "\n".join(lines)


def cohort_table(w: Workload, budget: float) -> str:
    """The largest K for each GPU model, with and without checkpointing and nf4, bf16 weights."""
    lines = ["| model | backbone | checkpointing | largest K | weights (GB) | per client (GB) | total at K (GB) |",
             "|---|---|---|---|---|---|---|"]
    for name, shapes in GPU_MODELS.items():
        for quantize in (None, "nf4"):
            for ckpt in (False, True):
                one = replace(w, quantize=quantize, checkpointing=ckpt, dtype_bytes=2)
                k = largest_cohort(shapes, one, budget)
                p1, p2 = predict(shapes, replace(one, clients=2)), predict(shapes, replace(one, clients=3))
                per_client = p2["total"] - p1["total"]
                total = predict(shapes, replace(one, clients=max(k, 1)))["total"]
                lines.append(f"| {name} | {'nf4' if quantize else 'bf16'} | {'on' if ckpt else 'off'} | {k:,} | "
                             f"{p1['weights'] / 1e9:.2f} | {per_client / 1e9:.3f} | {total / 1e9:.1f} |")
    return "\n".join(lines)


def settings(args) -> list[dict]:
    tiny = dict(zip(("hidden_size", "intermediate_size", "num_hidden_layers"), args.tiny))
    out = []
    for m, model in enumerate(args.models):
        seq = args.seq[min(m, len(args.seq) - 1)]
        for dtype in (args.dtypes if model == "tiny_llama" else ["fp32"]):
            for quantize in args.quantize:
                for ckpt in args.checkpointing:
                    for k in args.cohorts:
                        out.append(dict(model=model, dtype=dtype, clients=k, checkpointing=ckpt == "on",
                                        quantize=None if quantize == "none" else quantize, rows=args.rows,
                                        seq=seq, answers=args.answers, r=args.r,
                                        sizes=tiny if model == "tiny_llama" else {}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny_llama", "smollm2"], help="tiny_llama, smollm2")
    ap.add_argument("--cohorts", nargs="+", type=int, default=[1, 4, 8], help="K: 1 is sequential, K > 1 stacked")
    ap.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--quantize", nargs="+", default=["none", "nf4"], choices=["none", "nf4", "int8"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"],
                    help="tiny_llama's weights: fp32, bf16 (smollm2: fp32)")
    ap.add_argument("--tiny", nargs=3, type=int, default=[256, 768, 4], metavar=("HIDDEN", "INTERMEDIATE", "LAYERS"),
                    help="tiny_llama's sizes (multiples of 64: bitsandbytes' CPU 4-bit blocks)")
    ap.add_argument("--rows", type=int, default=4, help="rows per client")
    ap.add_argument("--seq", type=int, nargs="+", default=[128, 64], help="tokens per row, per model (last repeats)")
    ap.add_argument("--answers", type=int, default=8, help="answer tokens per row (scored by the loss)")
    ap.add_argument("-r", type=int, default=8, help="LoRA rank")
    ap.add_argument("--predict-only", action="store_true", help="only the K table (nothing measured)")
    ap.add_argument("--gpu-gb", type=float, default=80.0, help="the GPU's memory (decimal GB)")
    ap.add_argument("--context-gb", type=float, default=1.0, help="the CUDA context's share")
    ap.add_argument("--margin", type=float, default=0.10, help="the share left for fragmentation and transients")
    ap.add_argument("--k-rows", type=int, default=4, help="K table: rows per client")
    ap.add_argument("--k-seq", type=int, default=512, help="K table: tokens per row")
    ap.add_argument("--k-answers", type=int, default=128, help="K table: answer tokens per row")
    ap.add_argument("--out", type=Path, help="also write the tables here (markdown)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a JSON setting measured in this process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(**json.loads(args.one))))
        return
    parts = []
    if not args.predict_only:
        start = time.perf_counter()
        results = []
        for one in settings(args):
            results.append(_child(one))
            s = results[-1]
            print(f"{one['model']} {one['dtype']} K={one['clients']} ckpt={one['checkpointing']} "
                  f"{one['quantize']}: {s['total'] / MB:,.1f} MB measured, "
                  f"{s['predicted']['total'] / s['total']:.3f} predicted/measured ({s['seconds']:.1f} s)",
                  file=sys.stderr)
        seqs = " / ".join(f"{args.seq[min(m, len(args.seq) - 1)]} ({model})" for m, model in enumerate(args.models))
        parts.append(f"Measured on the CPU ({args.rows} rows x {seqs} tokens per client, {args.answers} answer "
                     f"tokens per row, LoRA r = {args.r}; MB; {time.perf_counter() - start:.0f} s):\n\n"
                     + measured_table(results))
    w = Workload(rows=args.k_rows, seq=args.k_seq, answers=args.k_answers, r=args.r)
    budget = gpu_budget(args.gpu_gb, args.context_gb, args.margin)
    parts.append(f"Predicted largest cohort on a {args.gpu_gb:g} GB GPU ({budget / 1e9:.1f} GB planned: "
                 f"{args.context_gb:g} GB CUDA context, {args.margin:.0%} margin), {args.k_rows} rows x {args.k_seq} "
                 f"tokens per client, {args.k_answers} answer tokens per row, LoRA r = {args.r} on q_proj and v_proj "
                 f"in fp32, AdamW:\n\n" + cohort_table(w, budget))
    text = "\n\n".join(parts)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
