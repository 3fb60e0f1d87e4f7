"""The GPU check's measurement: tokens/s and peak memory of celora's local training, sequential vs stacked cohorts
vs centralized, on randomly initialised models of real shapes fed synthetic token batches, so it needs no asset,
no network, no Hydra composition and no data layer. A markdown table (and its rows as jsonl) lands in --out.

    python3 scripts/gpu_bench.py --out gpu_results        # a CUDA machine: docs/parallel.md's GPU table
    python3 scripts/gpu_bench.py --tiny --out /tmp/dry    # the CPU dry run: tiny configs of the same shapes

Shapes (transformers configs, rope settings left at their defaults; throughput and memory do not depend on
pretrained weights, so none travel):
  minilm   BertConfig of all-MiniLM-L6-v2 (6 layers, hidden 384, vocabulary 30,522) under celora's Classifier
           (mean pooling, a 2-class head), Classify task; 64 clients x 4 steps of 16 rows of 32-64 tokens
  smollm2  LlamaConfig of SmolLM2-135M (30 layers, hidden 576, 9 / 3 heads, vocabulary 49,152) under celora's
           LanguageModel, Instruct task (loss on 2-8 answer tokens); 32 clients x 2 steps of 8 rows of 64-128 tokens
  llama1b  LlamaConfig of Llama-3.2-1B (16 layers, hidden 2048, 32 / 8 heads, MLP 8192, vocabulary 128,256),
           as smollm2; 16 clients x 2 steps of 4 rows of 64-128 tokens
LoRA r = 8 (celora.adapters.inject, the family's default targets: query + value, q_proj + v_proj), AdamW, clipping
1.0, as the default config. A row is one round: every client runs its steps from the same start, grouped as
celora.fl.cohorts groups them (sequential: one by one; stacked K: K clients in one batched pass; centralized: one
model on the pooled rows, batch clients x rows, for the same steps), after an untimed warm-up of the round's first
group. Tokens are celora's own count (input tokens of local training, padding not counted). Weights: fp32 and bf16
hold the frozen backbone in that dtype; nf4 replaces its linear maps (not the head or lm_head) by bitsandbytes'
4-bit NF4 layers with double quantisation and bf16 compute, as BitsAndBytesConfig(load_in_4bit=True, ...) loads
them (skipped, with a note, where bitsandbytes is missing). Checkpointing is transformers' own, non-reentrant.
Peak memory: on a GPU the peak allocated CUDA memory of the timed round (weights included); on the CPU the
model process's peak RSS so far. Each model runs in a process of its own, within --budget-s seconds; rows land
in rows.jsonl as they are measured, so a model cut off keeps the rows it finished.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

# what the offline GPU machine lacks and the wheelhouse does not bring: the bench must never import them
FORBIDDEN = ("datasets", "flwr", "flwr_datasets", "wandb", "opacus", "gguf")


@dataclass(frozen=True)
class Shape:
    """A model shape and its workload: how many clients, rows per step, tokens per row, steps and cohorts."""

    family: str  # bert: an encoder under a classification head; llama: a causal LM on instruction rows
    config: dict  # the transformers config's sizes
    clients: int
    batch: int
    length: int  # longest row, in tokens; rows are drawn between length / 2 and length
    steps: int
    cohorts: tuple = (1, 8, 32, "all")
    weights: tuple = ("fp32",)
    pad_id: int = 0


SHAPES = {
    "minilm": Shape("bert", dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                 intermediate_size=1536, max_position_embeddings=512), clients=64, batch=16,
                    length=64, steps=4),
    "smollm2": Shape("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                   tie_word_embeddings=True), clients=32, batch=8, length=128, steps=2,
                     weights=("fp32", "nf4"), pad_id=2),
    "llama1b": Shape("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                   max_position_embeddings=131072, tie_word_embeddings=True), clients=16, batch=4,
                     length=128, steps=2, cohorts=(1, 8, "all"), weights=("bf16", "nf4"), pad_id=128001),
}
# --tiny: the same families, settings and code paths at sizes a 2-core CPU runs in seconds
# (widths in blocks of 64: bitsandbytes' CPU 4-bit kernels take blocks of 64 input features)
TINY_SIZES = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
TINY = dict(clients=4, batch=2, length=16, steps=2, cohorts=(1, 2, "all"), pad_id=0)


def tiny(shape: Shape) -> Shape:
    sizes = {**TINY_SIZES, **({"num_key_value_heads": 2} if shape.family == "llama" else {})}
    keep = {k: v for k, v in shape.config.items() if k == "tie_word_embeddings"}
    return dataclasses.replace(shape, config={**sizes, **keep}, **TINY)


@dataclass
class Row:
    model: str
    weights: str
    precision: str
    checkpointing: bool
    setting: str  # sequential | stacked K=k | centralized
    device: str
    tokens: int = 0
    seconds: float = 0.0
    peak_mib: float | None = None
    status: str = "ok"  # ok | OOM | error: <exception> | <why it did not run>
    shape: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.status == "ok" and self.seconds > 0 else None


# ------------------------------------------------------------------------ one model, in its own process


def synthetic(shape: Shape, seed: int):
    """Each client's rows as celora's encoded data holds them, then the collator celora uses for the family:
    (Encoded, Collate) of token ids and a class, or (AnswerRows, AnswerCollate) with IGNORE on the prompt."""
    import torch

    from celora.data.batches import IGNORE, AnswerCollate, AnswerRows, Collate, Encoded

    gen = torch.Generator().manual_seed(seed)
    n = shape.clients * shape.batch * shape.steps  # each row seen once a round
    vocab = shape.config["vocab_size"]
    lengths = torch.randint(shape.length // 2, shape.length + 1, (n,), generator=gen).tolist()
    ids = [torch.randint(3, vocab, (k,), generator=gen).tolist() for k in lengths]
    labels = torch.randint(0, 2, (n,), generator=gen).tolist()
    if shape.family == "bert":
        return Encoded({"input_ids": ids, "label": labels}), Collate(shape.pad_id)
    answers = torch.randint(2, 9, (n,), generator=gen).tolist()  # "positive" + EOS is 2 tokens
    targets = [[IGNORE] * (len(r) - a) + r[-a:] for r, a in zip(ids, answers)]
    rows = AnswerRows({"input_ids": ids, "label": labels, "targets": targets, "task": [0] * n})
    return rows, AnswerCollate(shape.pad_id)


def build(shape: Shape, weights: str, device, seed: int):
    """(model, task, the PreTrainedModel inside, adapter config): random weights of the shape, adapted as celora
    adapts (inject with the family's default targets), the frozen backbone held as `weights`."""
    import torch
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    from celora.adapters import AdapterConfig, inject
    from celora.models.backbone import DEFAULT_TARGETS

    torch.manual_seed(seed)
    with torch.device(device):  # random init where the model runs: a 1B model initialises in seconds there
        if shape.family == "bert":
            from celora.models.classifier import Classifier
            from celora.tasks.classify import Classify

            inner = BertModel(BertConfig(**shape.config), add_pooling_layer=False)
            model, task = Classifier.frozen(inner, inner.config.hidden_size, 2, "mean", seed), Classify()
        else:
            from celora.models.llm import LanguageModel
            from celora.tasks.instruct import Instruct

            inner = LlamaForCausalLM(LlamaConfig(pad_token_id=shape.pad_id, **shape.config))
            model, task = LanguageModel(inner).requires_grad_(False), Instruct()
    if weights != "fp32":
        inner.to(torch.bfloat16)  # the frozen backbone; the adapter factors made below stay fp32 (client dtype)
    adapter = AdapterConfig()
    inject(model, adapter, DEFAULT_TARGETS[inner.config.model_type], seed=seed)
    if weights == "nf4":
        quantize_nf4(model, skip=("head", "lm_head"))
    return model.to(device).eval(), task, inner, adapter


def quantize_nf4(model, skip: tuple[str, ...]) -> None:
    """Every plain nn.Linear (the adapted ones under their AdapterLayer too), but those named in `skip`, becomes
    a bitsandbytes Linear4bit holding the same weights; they are quantized when the model moves to its device."""
    import bitsandbytes as bnb
    import torch
    from torch import nn
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or name in skip:
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=q.bnb_4bit_compute_dtype, quant_type=q.bnb_4bit_quant_type,
                                      compress_statistics=q.bnb_4bit_use_double_quant, device="meta")
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                             quant_type=q.bnb_4bit_quant_type,
                                             compress_statistics=q.bnb_4bit_use_double_quant)
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
            layer.support_avx512bf16_for_cpu = False  # no inference-only CPU repacking (celora.models.backbone)
            setattr(parent, name, layer)


def measure_model(name: str, shape: Shape, args, emit) -> None:
    """Every row of one model: per weights, precision and checkpointing, sequential, stacked K, centralized. A
    setting that runs out of memory is an OOM row; one that raises otherwise is an error row (its traceback in
    the log), and the rest still run."""
    import torch

    from celora.fl.client import set_trainable
    from celora.fl.engine import Engine
    from celora.fl.wire import Exchange
    from celora.tensors import snapshot

    cuda = args.device == "gpu"
    device = torch.device("cuda" if cuda else "cpu")
    data, collate = synthetic(shape, args.seed)
    n = shape.clients
    settings = [("sequential", None)] + [
        (f"stacked K={k}" if k != "all" else f"stacked K=all ({n})", k) for k in shape.cohorts
        if k == "all" or k < n] + [("centralized", None)]
    workload = dict(clients=n, batch=shape.batch, length=shape.length, steps=shape.steps,
                    layers=shape.config["num_hidden_layers"], hidden=shape.config["hidden_size"])

    for weights in shape.weights:
        precisions = args.precisions if weights == "fp32" else ["bf16-mixed"]  # bf16 and nf4 compute in bf16
        grid = [(p, c, s, k) for p in precisions for c in args.checkpointing for s, k in settings]
        base = dict(model=name, weights=weights, device=args.device, shape=workload)
        why = unavailable(weights)
        if why is None:
            try:
                model, task, inner, adapter = build(shape, weights, device, args.seed)
            except Exception as e:
                traceback.print_exc()
                why = f"error: {type(e).__name__} building the model"
        if why is not None:
            for precision, ckpt, setting, _ in grid:
                emit(Row(precision=precision, checkpointing=ckpt, setting=setting, status=why, **base))
            continue
        trainable = Exchange.of(model, adapter).trainable
        set_trainable(model, trainable)
        start = snapshot(model, trainable)
        engines = {}
        for precision, ckpt, setting, k in grid:
            row = Row(precision=precision, checkpointing=ckpt, setting=setting, **base)
            checkpointing(inner, ckpt)
            if precision not in engines:  # one Fabric per precision, as a run makes one
                engines[precision] = Engine(args.device, precision)
            one_round(row, model, task, trainable, start, engines[precision], data, collate, shape, k, args.seed,
                      cuda)
            emit(row)
        del model, inner, engines
        free(cuda)


def one_round(row: Row, model, task, trainable, start, engine, data, collate, shape: Shape, k, seed: int,
              cuda: bool) -> None:
    """Times one round of `row.setting` after a warm-up of its first group; fills the row's tokens, seconds and
    peak memory, or its status. The model's trainable tensors are back at `start` afterwards."""
    import torch

    from celora.data.batches import train_loader
    from celora.fl.client import Fitting
    from celora.fl.cohorts import plan
    from celora.tensors import load

    n, rows = shape.clients, shape.batch * shape.steps
    central = row.setting == "centralized"
    cohorts = plan(k)  # None: one by one
    batch = shape.batch * n if central else shape.batch  # centralized: the pooled rows, the same steps
    owners = [range(n * rows)] if central else [range(i * rows, (i + 1) * rows) for i in range(n)]
    fitting = Fitting(task=task, optimizer=partial(torch.optim.AdamW, lr=2e-3, weight_decay=0.0), grad_clip=1.0,
                      engine=engine)

    def train(groups, rnd):
        for group in groups:
            loaders = [train_loader(data, owners[i], batch, shape.steps, seed + 1000 * rnd + i, collate)
                       for i in group]
            cohorts.train(model, trainable, [start] * len(group), loaders, [shape.steps] * len(group), fitting,
                          collate.pad_id)

    groups = cohorts.groups(list(range(len(owners))))
    failure = None
    try:
        train(groups[:1], 0)  # warm-up: kernels, the allocator, autocast's casts
        sync(cuda)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        fitting.tokens.take()
        t0 = time.perf_counter()
        train(groups, 1)
        sync(cuda)
        row.seconds, row.tokens = time.perf_counter() - t0, fitting.tokens.take()
        row.peak_mib = (torch.cuda.max_memory_allocated() if cuda else
                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    except getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError):  # torch.OutOfMemoryError since 2.5
        failure = "OOM"
    except Exception as e:
        traceback.print_exc()
        failure = f"error: {type(e).__name__}"
    if failure:  # set outside the handler: its traceback no longer holds the round's tensors
        row.status = failure
    load(model, start)
    free(cuda)


def checkpointing(model, on: bool) -> None:
    """transformers' activation checkpointing, non-reentrant (a frozen backbone's inputs need no gradient for
    it); named gradient_checkpointing_* before transformers 5."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def unavailable(weights: str) -> str | None:
    if weights != "nf4":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # missing, or its native library not loadable here
        return f"bitsandbytes not importable ({type(e).__name__})"
    return None


def sync(cuda: bool) -> None:
    import torch

    if cuda:
        torch.cuda.synchronize()


def free(cuda: bool) -> None:
    import torch

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def child(args) -> None:
    """Measures one model, appending its rows to --rows as they come; then checks its imports stayed offline."""
    shape = SHAPES[args.model]
    if args.tiny:
        import torch

        shape = tiny(shape)
        torch.set_num_threads(1)  # the dry run checks the path, not the speed: one thread is immune to busy cores

    def emit(row: Row) -> None:
        with open(args.rows, "a") as f:
            f.write(json.dumps(dataclasses.asdict(row)) + "\n")
        rate = f"{row.tokens_per_s:,.0f} tokens/s" if row.tokens_per_s else row.status
        print(f"{row.model} {row.weights} {row.precision} ckpt={'on' if row.checkpointing else 'off'} "
              f"{row.setting}: {rate}", file=sys.stderr, flush=True)

    (Path(args.rows).parent / "env.json").write_text(json.dumps(environment(args)))
    measure_model(args.model, shape, args, emit)
    pulled = [m for m in FORBIDDEN if m in sys.modules]
    if pulled:
        sys.exit(f"gpu_bench imported {pulled}, which the offline GPU machine lacks")


# ------------------------------------------------------------------------ the table


def ratio(x: float | None, ref: float | None) -> str:
    return f"{x / ref:.2f}" if x and ref else "-"


def table(rows: list[Row]) -> str:
    """One line per row; the ratios are to the sequential and centralized rows of its group (model, weights,
    precision, checkpointing), measured in the same process."""
    lines = ["| model | weights | precision | checkpointing | setting | tokens/s | peak memory (MiB) | x sequential | "
             "x centralized |", "|---|---|---|---|---|---|---|---|---|"]
    for group in dict.fromkeys(key(r) for r in rows):
        mine = [r for r in rows if key(r) == group]
        seq = next((r.tokens_per_s for r in mine if r.setting == "sequential"), None)
        cen = next((r.tokens_per_s for r in mine if r.setting == "centralized"), None)
        for r in mine:
            rate = f"{r.tokens_per_s:,.0f}" if r.tokens_per_s else r.status
            peak = f"{r.peak_mib:,.0f}" if r.peak_mib is not None else "-"
            lines.append(f"| {r.model} | {r.weights} | {r.precision} | {'on' if r.checkpointing else 'off'} | "
                         f"{r.setting} | {rate} | {peak} | {ratio(r.tokens_per_s, seq)} | "
                         f"{ratio(r.tokens_per_s, cen)} |")
    return "\n".join(lines)


def key(r: Row) -> tuple:
    return r.model, r.weights, r.precision, r.checkpointing


def targets(rows: list[Row]) -> list[str]:
    """The issue's targets, read off the rows of each group: MiniLM's best stacked K at least 10x sequential and
    0.9x centralized; a 1B LLM with at least 8 clients stacked on one device."""
    out = []
    for group in dict.fromkeys(key(r) for r in rows if r.model == "minilm"):
        rate = {r.setting: r.tokens_per_s for r in rows if key(r) == group}
        stacked = {s: v for s, v in rate.items() if s.startswith("stacked") and v}
        seq, cen = rate.get("sequential"), rate.get("centralized")
        if not (stacked and seq and cen):
            out.append(f"- {named(group)}: not measured")
            continue
        best = max(stacked, key=stacked.get)
        met = stacked[best] >= 10 * seq and stacked[best] >= 0.9 * cen
        out.append(f"- {named(group)}: best {best}, {stacked[best] / seq:.1f}x sequential (target >= 10), "
                   f"{stacked[best] / cen:.2f}x centralized (target >= 0.9): {'met' if met else 'not met'}")
    for group in dict.fromkeys(key(r) for r in rows if r.model == "llama1b"):
        ran = [r for r in rows if key(r) == group and r.setting.startswith("stacked") and r.tokens_per_s]
        if not ran:
            out.append(f"- {named(group)}: no stacked cohort ran (target >= 8 clients stacked): not met")
            continue
        most = max(ran, key=clients_of)
        out.append(f"- {named(group)}: {clients_of(most)} clients stacked ({most.setting}, peak {most.peak_mib:,.0f} "
                   f"MiB; target >= 8): {'met' if clients_of(most) >= 8 else 'not met'}")
    return out


def named(group: tuple) -> str:
    model, weights, precision, ckpt = group
    return f"{model} {weights} {precision} checkpointing {'on' if ckpt else 'off'}"


def clients_of(r: Row) -> int:
    k = r.setting.split("K=")[1]
    return r.shape["clients"] if k.startswith("all") else int(k)


def environment(args) -> dict:
    """What ran the rows: the device and the versions that matter to them (a child writes it: the parent never
    initialises CUDA, so its context takes nothing from the children's memory)."""
    import torch
    import transformers

    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except Exception:
        bnb = "not importable"
    return {"device": torch.cuda.get_device_name(0) if args.device == "gpu" else "CPU", "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__, "bitsandbytes": bnb,
            "python": sys.version.split()[0]}


def header(env: dict, tiny: bool) -> str:
    if not env:
        return "No model ran."
    return (f"Device: {env['device']}; torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, "
            f"bitsandbytes {env['bitsandbytes']}; Python {env['python']}{'; tiny shapes (--tiny)' if tiny else ''}.")


def workloads(rows: list[Row]) -> list[str]:
    seen = {}
    for r in rows:
        seen.setdefault(r.model, r.shape)
    return [f"- {m}: {s['layers']} layers, hidden {s['hidden']}; {s['clients']} clients x {s['steps']} steps of "
            f"{s['batch']} rows of {s['length'] // 2}-{s['length']} tokens" for m, s in seen.items() if s]


def report(out: Path, tiny: bool, notes: list[str]) -> str:
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
    rows = read_rows(out / "rows.jsonl")
    aim = "Targets (tiny shapes on the CPU check the path; the targets are for the GPU run):" if tiny else "Targets:"
    parts = [header(env, tiny), "", *workloads(rows), "", table(rows), "", aim, *targets(rows)]
    if notes:
        parts += ["", "Notes:", *notes]
    return "\n".join(parts) + "\n"


def read_rows(path: Path) -> list[Row]:
    if not path.exists():
        return []
    return [Row(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_results"), help="folder of table.md and rows.jsonl")
    ap.add_argument("--tiny", action="store_true", help="tiny configs of the same shapes (the CPU dry run)")
    ap.add_argument("--device", choices=["gpu", "cpu", "auto"], default=None,
                    help="gpu (the default), cpu (the default with --tiny), auto: the GPU where torch sees one")
    ap.add_argument("--models", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--precisions", nargs="+", choices=["32-true", "bf16-mixed", "16-mixed"],
                    default=["32-true", "bf16-mixed"], help="of fp32 weights (bf16 and nf4 weights run bf16-mixed)")
    ap.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"])
    ap.add_argument("--budget-s", type=float, default=150, help="seconds a model may take (its process is ended)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", help=argparse.SUPPRESS)  # a child: measure this model
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.checkpointing = [c == "on" for c in args.checkpointing]
    if args.device is None:
        args.device = "cpu" if args.tiny else "gpu"
    if args.device in ("auto", "gpu"):
        import torch

        if args.device == "gpu" and not torch.cuda.is_available():
            sys.exit("gpu_bench: torch sees no CUDA device here; --tiny runs the CPU dry run (or --device cpu: real "
                     "shapes on the CPU)")
        args.device = "gpu" if torch.cuda.is_available() else "cpu"
    if args.model:
        child(args)
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    rows_path.unlink(missing_ok=True)
    (out / "env.json").unlink(missing_ok=True)
    notes = []
    for name in args.models:
        cmd = [sys.executable, __file__, "--model", name, "--rows", str(rows_path), "--device", args.device,
               "--precisions", *args.precisions, "--checkpointing", *["on" if c else "off" for c in args.checkpointing],
               "--seed", str(args.seed), *(["--tiny"] if args.tiny else [])]
        t0 = time.perf_counter()
        try:
            done = subprocess.run(cmd, timeout=args.budget_s)
            if done.returncode:
                notes.append(f"- {name}: its process failed (exit {done.returncode}); its rows so far are kept")
        except subprocess.TimeoutExpired:
            notes.append(f"- {name}: stopped at --budget-s {args.budget_s:.0f} s; its rows so far are kept")
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        (out / "table.md").write_text(report(out, args.tiny, notes))
    text = (out / "table.md").read_text()
    print(text)
    if notes:
        sys.exit(1)


if __name__ == "__main__":
    main()
