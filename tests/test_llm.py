"""The causal-LM path on a tiny random LLaMA with SmolLM2's tokenizer: answer-only loss, logits only where an
answer token is predicted, option-likelihood and greedy exact-match accuracy, per-client losses."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from celora.data.batches import AnswerCollate
from celora.tasks.instruct import (IGNORE, Instruct, cut_at_eos, exact_match, greedy, normalise, option_loglik,
                                   split_rows)
from tolerance import deep_approx

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def _backbone():
    from celora.models.llm import tiny_llama

    return tiny_llama(seed=0)


def _model(dtype=torch.float64):
    """A private copy of the tiny LM (injecting or casting must not reach the cached one)."""
    return copy.deepcopy(_backbone().classifier(0, seed=0)).to(dtype)


def _row(prompt: str, answer: str):
    tok = _backbone().tokenizer
    p = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    p = p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p
    a = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
    return p + a, [IGNORE] * len(p) + a


ROWS = [("Is this review positive or negative? A warm, funny film.", "positive"),
        ("Is this review positive or negative? Two hours I will never get back.", "negative"),
        ("Which party's convention is this sentence from? We built it.", "republican"),
        ("Which party's convention is this sentence from? Forward, together.", "democrat")]


def _batch(rows=ROWS):
    return AnswerCollate(_backbone().tokenizer.pad_token_id)([_row(p, a) for p, a in rows])


def test_collate_labels_the_answer_only():
    batch = _batch()
    prompts, answers = split_rows(batch)
    tok = _backbone().tokenizer
    for (_, answer), a in zip(ROWS, answers):
        assert a == tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert ((batch["labels"] != IGNORE) <= (batch["attention_mask"] == 1)).all()  # padding is never a target
    with pytest.raises(ValueError, match="token ids but"):
        AnswerCollate(0)([([1, 2, 3], [IGNORE, 2])])


def test_loss_covers_the_answer_tokens_only():
    model, batch = _model(), _batch()
    task = Instruct()
    loss = task.loss(model, batch)
    # the same loss from the full logits at every position, prompt positions ignored (fp64: DEEP roundings)
    logits = model(batch["input_ids"], batch["attention_mask"])
    full = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE)
    assert loss.item() == deep_approx(full.item())
    # and the prompt really is left out: labelling it too changes the loss
    labelled = dict(batch, labels=torch.where(batch["attention_mask"] == 1, batch["input_ids"], IGNORE))
    assert task.loss(model, labelled).item() != deep_approx(loss.item())
    # changing a prompt token's label among the ignored ones (-100 stays -100 by construction) cannot matter,
    # but changing the prompt's *inputs* must: the answer is predicted from the prompt
    other = dict(batch, input_ids=batch["input_ids"].clone())
    other["input_ids"][:, 3] = 42
    assert task.loss(model, other).item() != deep_approx(loss.item())


def test_per_client_loss_is_each_clients_mean_over_its_own_answer_tokens():
    model, batch = _model(), _batch()
    task = Instruct()
    both = task.loss(model, batch, clients=2)
    for k in range(2):
        own = {n: t[2 * k: 2 * k + 2] for n, t in batch.items()}
        assert both[k].item() == deep_approx(task.loss(model, own).item())


def test_option_likelihood_sums_the_options_log_probabilities_and_picks_the_best():
    model, batch = _model(), _batch(ROWS[:2])
    tok = _backbone().tokenizer
    prompts, _ = split_rows(batch)
    options = [tok(w, add_special_tokens=False).input_ids + [tok.eos_token_id] for w in ("positive", "negative")]
    ll = option_loglik(model, prompts, [options] * len(prompts), tok.pad_token_id)
    for i, p in enumerate(prompts):  # by hand, one sequence at a time, from the full logits
        for j, o in enumerate(options):
            ids = torch.tensor([p + o])
            logp = model(ids, torch.ones_like(ids))[0].log_softmax(-1)
            by_hand = sum(logp[len(p) - 1 + t, o[t]].item() for t in range(len(o)))
            assert ll[i, j].item() == deep_approx(by_hand)
    # a constructed case: each row's reference is, or is not, the option the model likes best
    best = ll.argmax(1).tolist()
    words = ["positive", "negative"]
    task = Instruct(accuracy="likelihood")
    pad = max(len(o) for o in options)
    opts = torch.tensor([o + [IGNORE] * (pad - len(o)) for o in options])
    right = _batch([(ROWS[i][0], words[b]) for i, b in enumerate(best)])
    wrong = _batch([(ROWS[i][0], words[1 - b]) for i, b in enumerate(best)])
    assert task.correct(model, dict(right, options=opts)).tolist() == [True, True]
    assert task.correct(model, dict(wrong, options=opts)).tolist() == [False, False]
    with pytest.raises(ValueError, match="task.accuracy=generate"):
        task.correct(model, right)


def test_exact_match_normalises_case_punctuation_and_white_space_and_stops_at_eos():
    assert normalise("  Positive.\n") == "positive" and exact_match(" Negative!", "negative")
    assert exact_match("the  Republican\tparty", "The republican party.")
    assert not exact_match("positive", "negative") and not exact_match("", "positive")
    assert cut_at_eos([5, 6, 2, 7], 2) == [5, 6] and cut_at_eos([5, 6], 2) == [5, 6]
    assert cut_at_eos([5, 2], [9, 2]) == [5] and cut_at_eos([5, 2], None) == [5, 2]


def test_greedy_generation_equals_transformers_generate():
    model = _model(torch.float32)
    tok = _backbone().tokenizer
    prompts, _ = split_rows(_batch())
    ours = greedy(model, prompts, 6, tok.eos_token_id, tok.pad_token_id)  # one right-padded batch
    for p, g in zip(prompts, ours):
        ids = torch.tensor([p])
        ref = model.lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert g == cut_at_eos(ref, tok.eos_token_id)


def test_generate_accuracy_compares_normalised_text():
    model = _model(torch.float32)
    tok = _backbone().tokenizer
    batch = _batch(ROWS[:2])
    prompts, _ = split_rows(batch)
    said = [tok.decode(g, skip_special_tokens=True) for g in greedy(model, prompts, 4, tok.eos_token_id, tok.pad_token_id)]
    task = Instruct(accuracy="generate", max_new_tokens=4).use_tokenizer(tok)
    # references equal to what the model says (upper-cased, padded with spaces: still a match) and not equal
    right = _batch([(ROWS[i][0], f"  {s.upper()} ") for i, s in enumerate(said)])
    assert task.correct(model, right).tolist() == [True, True]
    wrong = _batch([(ROWS[i][0], s + " not") for i, s in enumerate(said)])
    assert task.correct(model, wrong).tolist() == [False, False]


def test_scores_are_per_client_sums_with_perplexity_parts():
    model, batch = _model(), _batch()
    task = Instruct()
    one = [task.scores(model, {n: t[k: k + 1] for n, t in batch.items()} | {"options": _opts()}) for k in range(4)]
    two = task.scores(model, dict(batch, options=_opts()), clients=2)
    assert two["examples"].tolist() == [2, 2]
    for key in ("tokens", "token_loss", "loss", "correct"):
        for k in range(2):
            assert two[key][k].item() == deep_approx(one[2 * k][key].item() + one[2 * k + 1][key].item())
    masked = task.scores(model, dict(batch, options=_opts()), clients=2, valid=torch.tensor([[1, 0], [1, 1]]).bool())
    assert masked["examples"].tolist() == [1, 2] and masked["tokens"][0].item() == one[0]["tokens"].item()
    # scoring reuses each row's own answer likelihood; the answers found are those of scoring every option
    assert two["correct"].tolist() == task.correct(model, dict(batch, options=_opts())).view(2, 2).sum(1).tolist()


def test_rows_may_have_options_of_their_own_and_fewer_than_others():
    model, batch = _model(), _batch()
    tok = _backbone().tokenizer
    word = lambda w: tok(w, add_special_tokens=False).input_ids + [tok.eos_token_id]  # noqa: E731
    prompts, _ = split_rows(batch)
    per_row = [[word("positive"), word("negative")]] * 2 + [[word("republican"), word("democrat"), word("green")]] * 2
    ll = option_loglik(model, prompts, per_row, tok.pad_token_id)
    assert ll.shape == (4, 3) and torch.isinf(ll[:2, 2]).all() and torch.isfinite(ll[2:]).all()
    shared = option_loglik(model, prompts[2:], [per_row[2]] * 2, tok.pad_token_id)
    for got, want in zip(ll[2:].flatten().tolist(), shared.flatten().tolist()):  # fp64, other batch shapes
        assert got == deep_approx(want)


def _opts():
    tok = _backbone().tokenizer
    options = [tok(w, add_special_tokens=False).input_ids + [tok.eos_token_id]
               for w in ("positive", "negative", "republican", "democrat")]
    pad = max(len(o) for o in options)
    return torch.tensor([o + [IGNORE] * (pad - len(o)) for o in options])


def test_rates_give_accuracy_row_mean_loss_and_token_perplexity():
    import math

    rates = Instruct().rates({"examples": 4, "correct": 3, "loss": 6.0, "tokens": 10, "token_loss": 15.0})
    assert rates == {"acc": 0.75, "loss": 1.5, "ppl": math.exp(1.5)}
    assert Instruct().metrics == tuple(rates)


def test_bad_task_values_are_named():
    with pytest.raises(ValueError, match="task.accuracy must be one of"):
        Instruct(accuracy="bleu")
    with pytest.raises(ValueError, match="task.max_new_tokens must be >= 1"):
        Instruct(max_new_tokens=0)


# ---------------------------------------------------------------- GGUF -> cached safetensors folder


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-level BPE alphabet: one printable character per byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_gguf(path, hidden=16, layers=1, heads=2, kv=1, ff=24, seed=0):
    """A LLaMA GGUF file of random float32 weights and a byte-level BPE tokenizer, as llama.cpp lays it out."""
    import gguf
    import numpy as np

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_alphabet(), "Ġt", "Ġth"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    w.add_token_merges(["Ġ t", "Ġt h"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    rng = np.random.default_rng(seed)
    hd = hidden // heads
    shapes = {"token_embd.weight": (len(tokens), hidden)}
    for b in range(layers):
        shapes |= {f"blk.{b}.attn_q.weight": (hidden, hidden), f"blk.{b}.attn_k.weight": (kv * hd, hidden),
                   f"blk.{b}.attn_v.weight": (kv * hd, hidden), f"blk.{b}.attn_output.weight": (hidden, hidden),
                   f"blk.{b}.ffn_gate.weight": (ff, hidden), f"blk.{b}.ffn_up.weight": (ff, hidden),
                   f"blk.{b}.ffn_down.weight": (hidden, ff)}
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    for name in ["output_norm.weight", *(f"blk.{b}.{n}_norm.weight" for b in range(layers) for n in ("attn", "ffn"))]:
        w.add_tensor(name, np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gguf_checkpoint_is_converted_once_into_a_folder_with_the_same_weights(tmp_path, monkeypatch):
    import transformers

    from celora.models.llm import gguf_folder, hf_causal_lm

    (tmp_path / "src").mkdir()
    path = tmp_path / "src" / "tiny.gguf"
    write_tiny_gguf(path)
    folder = gguf_folder(path, tmp_path / "cache")
    direct = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    loaded = hf_causal_lm(str(folder))
    assert type(loaded.lm).__name__ == "LlamaForCausalLM" and loaded.lm.config.num_hidden_layers == 1
    theirs = direct.state_dict()
    assert loaded.lm.state_dict().keys() == theirs.keys()
    assert all(torch.equal(t, theirs[n]) for n, t in loaded.lm.state_dict().items())  # exact: saved, not recomputed
    direct_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert loaded.tokenizer("the cat").input_ids == direct_tok("the cat").input_ids
    # the second use reads the folder: converting again would call from_pretrained on the GGUF file
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("converted twice"))
    assert gguf_folder(path, tmp_path / "cache") == folder
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a hub id"):
        hf_causal_lm(str(tmp_path / "missing"))


# ---------------------------------------------------------------- bytes from the config


def _sent(variant: str, targets, r: int = 4) -> int:
    from celora.adapters import AdapterConfig, inject
    from celora.fl.wire import Exchange

    spec = {"lora": dict(trainable=["A", "B"], shared=["A", "B"]),
            "tri": dict(zero="C", trainable=["C"], shared=["C"])}[variant]
    model = _model(torch.float32)
    cfg = AdapterConfig(name=variant, r=r, alpha=2.0 * r, **spec)
    inject(model, cfg, targets, seed=1)
    state = dict(model.named_parameters())
    return sum(state[n].numel() for n in Exchange.of(model, cfg).shared)


def test_values_sent_follow_from_the_model_config():
    c = _backbone().lm.config
    layers, d, r = c.num_hidden_layers, c.hidden_size, 4
    head_dim = d // c.num_attention_heads
    q_out, kv_out = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    # the default targets q_proj (d -> q_out) and v_proj (d -> kv_out); no task head: the answers are tokens
    assert _backbone().default_targets == ["q_proj", "v_proj"]
    assert _sent("lora", ["q_proj", "v_proj"]) == layers * r * ((d + q_out) + (d + kv_out))
    assert _sent("tri", ["q_proj", "v_proj"]) == layers * 2 * r * r
    # all-linear: q, k, v, o and the MLP's gate, up, down in every block, never lm_head
    f = c.intermediate_size
    maps = [(d, q_out), (d, kv_out), (d, kv_out), (q_out, d), (d, f), (d, f), (f, d)]
    assert _sent("lora", "all-linear") == layers * r * sum(i + o for i, o in maps)
    assert _sent("tri", ["all-linear"]) == layers * len(maps) * r * r


def test_smollm2_formula_from_its_config():
    """The issue's hand count for SmolLM2 (q: 576 -> 576, v: 576 -> 192, 30 layers, r = 8), from its config."""
    from transformers import LlamaConfig

    c = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30)
    head_dim = c.hidden_size // c.num_attention_heads
    lora = c.num_hidden_layers * 8 * ((576 + c.num_attention_heads * head_dim) + (576 + c.num_key_value_heads * head_dim))
    assert lora == 460_800 and c.num_hidden_layers * 2 * 8 * 8 == 3_840 and lora // 3_840 == 120


# ---------------------------------------------------------------- the zero-shot script


def _zero_shot():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from llm_zero_shot import zero_shot

    return zero_shot


def test_zero_shot_script_scores_a_fixed_slice(tmp_path):
    out = _zero_shot()("tiny_llama", n=8, batch_size=3)  # batches of 3: the last one is short
    assert out["questions"] == 8 and out["accuracy"] * 8 == round(out["accuracy"] * 8)
    assert out == {**_zero_shot()("tiny_llama", n=8, batch_size=8), "load_s": out["load_s"], "score_s": out["score_s"]}


@pytest.mark.slow
def test_smollm2_zero_shot_on_200_review_questions():
    """The real model (about 20 s to convert on first use, then about a minute to score on 2 cores)."""
    out = _zero_shot()("smollm2", n=200)
    assert out["questions"] == 200 and 0 <= out["accuracy"] <= 1
    # better than answering the majority class every time would be
    assert out["accuracy"] > max(out["positive_share"], 1 - out["positive_share"])


def test_a_causal_lm_on_a_classification_run_is_refused_with_the_reason(compose_cfg, tmp_path):
    from celora.run import run

    # the task follows the model (instruct), the dataset does not: the options that would agree are named
    with pytest.raises(ValueError, match=r"model=tiny_llama answers in tokens, dataset=rotten_tomatoes answers in "
                                         r"classes, task=instruct answers in tokens: they must agree .* use "
                                         r"dataset=hf_instruct, instruct_mix, multiple_choice, party_instruct or rt_instruct"):
        run(compose_cfg("+debug=tiny", "model=tiny_llama"), run_dir=tmp_path / "a")
    with pytest.raises(ValueError, match=r"task=instruct answers in tokens: .* use task=classify"):
        run(compose_cfg("+debug=tiny", "task=instruct"), run_dir=tmp_path / "b")
