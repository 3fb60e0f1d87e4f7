"""Scoring and generation from the KV cache (celora.tasks.decoding) equal the computations they replace, the
packed forward of prompt + option for every pair and the full forward per new token, for one model and for a
stacked cohort whose row blocks each use their own client's adapter."""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

from celora.adapters import inject
from celora.adapters.config import AdapterConfig
from celora.adapters.stacking import stacked
from celora.data.batches import IGNORE, AnswerCollate, right_pad
from celora.tasks.decoding import decoder_pass, option_logliks, prompts_of
from celora.tasks.instruct import (Instruct, answer_token_losses, greedy, option_loglik, per_row, prompt_lengths,
                                   split_rows)
from tolerance import assert_deep_close

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [("Is this review positive or negative? A warm, funny film.", "positive"),
        ("Which party's convention is this sentence from? Forward, together, for every family.", "democrat")]
SCALE = 1.0
WORDS = [["positive", "negative"], ["republican", "democrat", "green party"]]  # per row, of different lengths


@functools.lru_cache(maxsize=None)
def _backbone():
    from celora.models.llm import tiny_llama

    return tiny_llama(seed=0)


def _word(w: str) -> list[int]:
    tok = _backbone().tokenizer
    return tok(w, add_special_tokens=False).input_ids + [tok.eos_token_id]


def _batch(rows) -> dict[str, torch.Tensor]:
    tok = _backbone().tokenizer
    out = []
    for prompt, answer in rows:
        p = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        p = p["input_ids"] if hasattr(p, "keys") else p
        out.append((p + _word(answer), [IGNORE] * len(p) + _word(answer)))
    return AnswerCollate(tok.pad_token_id)(out)


def _cohort(k: int):
    """A tiny LLaMA in fp64 with LoRA on q and v, and k clients' random B (so each client's outputs differ)."""
    model = copy.deepcopy(_backbone().classifier(0, seed=0)).double()
    inject(model, AdapterConfig(r=4), ["q_proj", "v_proj"], seed=1)
    gen = torch.Generator().manual_seed(2)
    names = [n for n, _ in model.named_parameters() if n.endswith("lora_B")]
    params = dict(model.named_parameters())
    states = [{n: torch.randn(params[n].shape, generator=gen, dtype=torch.float64) * SCALE for n in names}
              for _ in range(k)]
    return model.eval(), states


def _alone(model, state):
    alone = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in alone.named_parameters():
            if n in state:
                p.copy_(state[n])
    return alone


def _uncached(model, prompts, options, pad_id):
    """The code before the cache: one packed forward over prompt + option for every (prompt, option) pair."""
    pairs = [(k, j) for k, opts in enumerate(options) for j, o in enumerate(opts) if o]
    out = torch.full((len(prompts), max(map(len, options))), -math.inf, dtype=torch.float64)
    ids, mask = right_pad([prompts[k] + options[k][j] for k, j in pairs], pad_id)
    labels, _ = right_pad([[IGNORE] * len(prompts[k]) + options[k][j] for k, j in pairs], IGNORE)
    ce, row = answer_token_losses(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    rows, cols = zip(*pairs)
    out[list(rows), list(cols)] = -per_row(ce.double(), row, len(pairs))
    return out


def _assert_scores_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """The same options missing (-inf), the others' log-likelihoods DEEP roundings apart (fp64)."""
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert_deep_close(got[torch.isfinite(want)], want[torch.isfinite(want)])


@torch.no_grad()
def _step_by_step(model, prompts, max_new_tokens, eos, pad_id):
    """The greedy loop before `generate`: a full forward of the right-padded batch for every new token."""
    out, done = [[] for _ in prompts], [False] * len(prompts)
    for _ in range(max_new_tokens):
        ids, mask = right_pad([p + o for p, o in zip(prompts, out)], pad_id)
        last = model.hidden(ids, mask)[torch.arange(len(ids)), mask.sum(1) - 1]
        for k, t in enumerate(model.lm_head(last).argmax(-1).tolist()):
            if not done[k]:
                done[k] = t == eos
                out[k] += [] if done[k] else [t]
    return out


@torch.no_grad()
def test_cached_option_scores_equal_a_forward_per_option_for_one_model_and_a_cohort():
    model, states = _cohort(2)
    pad = _backbone().tokenizer.pad_token_id
    batch = _batch(ROWS + ROWS)  # client-major: rows 0-1 client 0's, rows 2-3 client 1's
    prompts, answers = split_rows(batch)
    options = [[_word(w) for w in WORDS[k % 2]] for k in range(4)]
    options[1][0] = []  # a missing option (as the answer is, among its rivals) scores -inf
    # one model: the prompts' own forward, and the batch's (prompt + answer) forward masked to its prompts
    alone = _alone(model, states[0])
    want = _uncached(alone, prompts, options, pad)
    _assert_scores_equal(option_loglik(alone, prompts, options, pad), want)
    hidden, cache = decoder_pass(alone, batch["input_ids"], batch["attention_mask"])
    _assert_scores_equal(option_logliks(alone, prompts_of(hidden, cache, prompt_lengths(batch)), options), want)
    assert torch.isinf(want[1, 0]) and torch.isinf(want[0, 2]) and torch.isfinite(want[1, 1:]).all()
    # a stacked cohort: every forward keeps the 4 rows in their client blocks
    with stacked(model, states):
        together = option_loglik(model, prompts, options, pad)
        hidden, cache = decoder_pass(model, batch["input_ids"], batch["attention_mask"])
        from_batch = option_logliks(model, prompts_of(hidden, cache, prompt_lengths(batch)), options)
    for k, state in enumerate(states):
        want = _uncached(_alone(model, state), prompts[2 * k: 2 * k + 2], options[2 * k: 2 * k + 2], pad)
        _assert_scores_equal(together[2 * k: 2 * k + 2], want)
        _assert_scores_equal(from_batch[2 * k: 2 * k + 2], want)
    assert not torch.allclose(together[:2], together[2:])  # the clients' adapters really differ


@torch.no_grad()
def test_likelihood_scores_find_the_answers_the_uncached_options_find():
    """Instruct.scores (rivals from the batch's own cache), one row per client: a client's count is whether its
    row's answer is the option of highest likelihood uncached."""
    model, states = _cohort(4)
    pad = _backbone().tokenizer.pad_token_id
    words = ("positive", "negative")
    review = "Is this review positive or negative? Two hours I will never get back, and the popcorn was cold."
    rows = [(ROWS[0][0], "positive"), (ROWS[0][0], "positive"), (review, "negative"), (review, "negative")]
    batch = _batch(rows)
    opts = torch.tensor([o + [IGNORE] * (3 - len(o)) for o in map(_word, words)])
    prompts, _ = split_rows(batch)
    with stacked(model, states):
        got = Instruct().scores(model, dict(batch, options=opts), clients=4)["correct"]
    best = [int(_uncached(_alone(model, s), [p], [list(map(_word, words))], pad).argmax()) for p, s in zip(prompts, states)]
    assert got.tolist() == [int(words[b] == a) for b, (_, a) in zip(best, rows)]
    assert 0 < sum(got.tolist()) < 4  # found and missed answers both


@pytest.mark.parametrize("clients", [1, 2])
def test_generate_with_the_cache_equals_the_step_by_step_greedy(clients):
    model, states = _cohort(clients)
    tok = _backbone().tokenizer
    prompts, _ = split_rows(_batch(ROWS * clients))  # prompts of different lengths: left padding matters
    stop = None
    for eos in (tok.eos_token_id, "said"):  # the tiny LM never says EOS: then stop at a token it says
        eos = stop if eos == "said" else eos
        with torch.no_grad(), stacked(model, states):
            together = greedy(model, prompts, 6, eos, tok.pad_token_id)
        for k, state in enumerate(states):
            want = _step_by_step(_alone(model, state), prompts[2 * k: 2 * k + 2], 6, eos, tok.pad_token_id)
            assert together[2 * k: 2 * k + 2] == want
        stop = together[-1][1] if stop is None else stop
    if clients == 2:
        assert together[:2] != together[2:]  # the same prompts, each block with its own client's adapter
