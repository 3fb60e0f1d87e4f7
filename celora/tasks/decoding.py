"""A causal LM's prompts run once: options scored from each prompt's KV cache, and greedy generation through
transformers' `generate`. Every forward keeps the batch's rows in place, so a stacked cohort's K client blocks
(client-major) each meet their own client's adapter."""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from celora.data.batches import IGNORE, right_pad
from celora.tasks.classify import widened


def decoder_pass(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None, cache=None) -> tuple[torch.Tensor, object]:
    """(the last hidden states [rows, length, hidden], the KV cache grown by these tokens) of `model.lm`'s
    decoder; `cache` (keys and values of earlier positions) and `attention_mask` over them and these."""
    decoder = model.lm.get_decoder()
    name = _cache_argument(type(decoder))
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                  **{name: cache})
    return out.last_hidden_state, getattr(out, name)


@functools.lru_cache(maxsize=None)
def _cache_argument(decoder: type) -> str:
    """The decoder's name for its KV cache: `cache` (recent transformers) or `past_key_values` (older ones)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


@dataclass
class Prompts:
    """Each row's prompt, run once: what scoring a continuation after it needs."""

    last: torch.Tensor     # [rows, hidden]: the hidden state at each prompt's last token (predicts the next)
    cache: object          # the KV cache of a forward whose first positions of each row are its prompt
    mask: torch.Tensor     # [rows, cached length]: 1 on each row's prompt, 0 on what follows it there
    lengths: torch.Tensor  # [rows]: the prompts' lengths


def prompts_of(hidden: torch.Tensor, cache, lengths: torch.Tensor) -> Prompts:
    """The prompts inside an earlier forward over right-padded rows that start with them (e.g. prompt + answer:
    causal attention makes a prompt's keys and values those of the prompt alone)."""
    rows = torch.arange(len(lengths), device=hidden.device)
    last = hidden[rows, (lengths - 1).clamp_min(0)]
    mask = (torch.arange(hidden.shape[1], device=hidden.device) < lengths.unsqueeze(1)).long()
    return Prompts(last, cache, mask, lengths)


def run_prompts(model: nn.Module, prompts: list[list[int]], pad_id: int) -> Prompts:
    """One forward over the right-padded prompts (non-empty token lists), keeping its KV cache."""
    device = next(model.parameters()).device
    ids, mask = right_pad(prompts, pad_id)
    hidden, cache = decoder_pass(model, ids.to(device), mask.to(device))
    return prompts_of(hidden, cache, torch.tensor([len(p) for p in prompts], device=device))


def option_logliks(model: nn.Module, prompts: Prompts, options: list[list[list[int]]]) -> torch.Tensor:
    """[rows, most options] fp64: the summed log-likelihood of each of a row's options (token ids) after its
    prompt; -inf where a row has fewer options (or an empty one).

    The i-th (non-empty) option of every row is one forward of its tokens but the last over the prompts' cache
    (the first token is predicted from the prompt's last hidden state), at positions right after each prompt;
    the cache is cropped back afterwards. So the prompt runs once, and the forwards are as many as the most
    options a row has (each reads every weight, however few its tokens); each has the batch's rows, in place
    and all of them (a row without an i-th option feeds masked padding)."""
    rows, device = len(options), prompts.last.device
    out = torch.full((rows, max(map(len, options), default=0)), -math.inf, dtype=torch.float64)
    present = [[(j, o) for j, o in enumerate(opts) if o] for opts in options]
    for i in range(max(map(len, present), default=0)):
        col = torch.tensor([p[i][0] if i < len(p) else 0 for p in present])
        opts = [p[i][1] if i < len(p) else [] for p in present]
        has = torch.tensor([len(o) > 0 for o in opts])
        # the first token, from the prompt's last hidden state (none before an empty prompt, as in one forward)
        first = has & (prompts.lengths.cpu() > 0)
        ces = [F.cross_entropy(widened(model.lm_head(prompts.last[first.to(device)])),
                               torch.tensor([o[0] for o, f in zip(opts, first) if f], dtype=torch.long, device=device),
                               reduction="none")]
        at = [first.nonzero()[:, 0]]
        longest = max(map(len, opts))
        if longest > 1:  # the others, each predicted by its predecessor: one forward of o[:-1] per row
            ids, mask = right_pad([o[:-1] for o in opts], 0)
            targets, _ = right_pad([o[1:] for o in opts], IGNORE)
            ids, mask, targets = ids.to(device), mask.to(device), targets.to(device)
            positions = prompts.lengths.unsqueeze(1) + torch.arange(longest - 1, device=device)
            hidden, _ = decoder_pass(model, ids, torch.cat([prompts.mask, mask], 1), positions, prompts.cache)
            prompts.cache.crop(-(longest - 1))  # the prompts' cache again, for the next option
            where = targets != IGNORE
            ces.append(F.cross_entropy(widened(model.lm_head(hidden[where])), targets[where], reduction="none"))
            at.append(where.nonzero()[:, 0].cpu())
        # summed per row in token order (the first, then the rest), as one forward over prompt + option sums them
        ll = torch.zeros(rows, dtype=torch.float64)
        for ce, row in zip(ces, at):
            ll.index_add_(0, row, ce.double().cpu())
        out[has.nonzero()[:, 0], col[has]] = -ll[has]
    return out


@torch.no_grad()
def generate(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, eos: int | None,
             pad_id: int) -> list[list[int]]:
    """Each prompt's greedy continuation (`max_new_tokens`, or fewer when every row has met `eos`; a row that
    has is padded with `pad_id`) by `model.lm.generate` over one left-padded batch: with the KV cache each new
    token is one step of the batch's rows, which stay in place."""
    device = next(model.parameters()).device
    longest = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                            num_beams=1, eos_token_id=eos, pad_token_id=pad_id)
    return out[:, longest:].tolist()
