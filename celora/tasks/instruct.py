"""Instruction tuning of a causal LM: a prompt, then the answer. The loss covers the answer tokens only, and
the vocabulary logits are computed only where an answer token is predicted."""
from __future__ import annotations

import math
import re
import string
from typing import Annotated, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from celora.data.batches import IGNORE
from celora.errors import ConfigError, InputError
from celora.schema import Range
from celora.tasks import Task, subjects
from celora.tasks.classify import widened
from celora.tasks.decoding import Prompts, decoder_pass, generate, option_logliks, prompts_of, run_prompts

Accuracy = Literal["likelihood", "generate"]
ACCURACY = get_args(Accuracy)


def answer_token_losses(model: nn.Module, batch: dict[str, torch.Tensor],
                        hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token cross-entropy [n], the row of each [n]) over every answer token of the batch. Position t's
    hidden state predicts token t + 1, so only the positions before an answer token reach `lm_head`.
    `hidden`: the batch's last hidden states when already computed."""
    labels = batch["labels"]
    if hidden is None:
        hidden = model.hidden(batch["input_ids"], batch["attention_mask"])
    targets = labels[:, 1:]
    where = targets != IGNORE
    logits = model.lm_head(hidden[:, :-1][where])
    return F.cross_entropy(widened(logits), targets[where], reduction="none"), where.nonzero()[:, 0]


def per_row(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, rows, values)


def normalise(text: str) -> str:
    """Lower case, punctuation and surrounding white space removed, inner white space collapsed."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def exact_match(generated: str, reference: str) -> bool:
    return normalise(generated) == normalise(reference)


def cut_at_eos(tokens: list[int], eos: int | list[int] | None) -> list[int]:
    """The generated tokens up to (without) the first end-of-sequence token."""
    stops = {eos} if isinstance(eos, int) else set(eos or [])
    for k, t in enumerate(tokens):
        if t in stops:
            return tokens[:k]
    return tokens


def option_loglik(model: nn.Module, prompts: list[list[int]], options: list[list[list[int]]],
                  pad_id: int) -> torch.Tensor:
    """[prompts, most options]: the summed log-likelihood of each of a prompt's options (token ids; its own
    list per prompt) after it; -inf where a prompt has fewer options (or an empty one). Each prompt runs once,
    its options from its KV cache (celora.tasks.decoding)."""
    if not any(o for opts in options for o in opts):
        return torch.full((len(prompts), max(map(len, options))), -math.inf, dtype=torch.float64)
    return option_logliks(model, run_prompts(model, prompts, pad_id), options)


def row_options(batch: dict[str, torch.Tensor]) -> list[list[list[int]]]:
    """Each row's options as token lists, from the IGNORE-padded `options`: [rows, options, longest], or
    [options, longest] for one set shared by every row."""
    options = batch["options"]
    if options.dim() == 2:
        options = options.unsqueeze(0).expand(len(batch["input_ids"]), -1, -1)
    return [[[t for t in o if t != IGNORE] for o in opts] for opts in options.tolist()]


class Instruct(Task):
    """Answer-token cross-entropy; scores: answer tokens, their summed loss (perplexity = exp(loss / tokens)),
    and answer accuracy, by `accuracy`:
    - likelihood: among `options` (a closed label set, as token ids), the one of highest log-likelihood
      after the prompt is the answer;
    - generate: the greedy generation (at most `max_new_tokens`, cut at EOS) matches the reference answer
      exactly after `normalise`.
    """

    answers = "tokens"
    metrics = ("acc", "loss", "ppl")

    def __init__(self, accuracy: Accuracy = "likelihood", max_new_tokens: Annotated[int, Range(ge=1)] = 8):
        if accuracy not in ACCURACY:
            raise ConfigError(f"task.accuracy must be one of {ACCURACY}, got {accuracy!r}")
        if max_new_tokens < 1:
            raise ConfigError(f"task.max_new_tokens must be >= 1, got {max_new_tokens}")
        self.accuracy, self.max_new_tokens = accuracy, max_new_tokens
        self.tokenizer = None  # set by use_tokenizer: text comparison, EOS and padding ids for generation

    def bind(self, backbone, data) -> None:
        """The model's tokenizer (generation stops at its EOS and is compared as text)."""
        self.use_tokenizer(backbone.tokenizer)

    def use_tokenizer(self, tokenizer) -> Instruct:
        """The model's tokenizer, for decoding generations (exact match is on normalised text) and its EOS id."""
        self.tokenizer = tokenizer
        return self

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], clients: int = 1) -> torch.Tensor:
        """[clients]: each client's mean over its own answer tokens (rows are clients' blocks, client-major)."""
        ce, row = answer_token_losses(model, batch)
        client = row // (len(batch["labels"]) // clients)
        total = per_row(ce, client, clients)
        count = per_row(torch.ones_like(ce), client, clients)
        return total / count.clamp_min(1)

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor], clients: int = 1) -> torch.Tensor:
        """[clients]: each client's summed answer-token loss."""
        ce, row = answer_token_losses(model, batch)
        return per_row(ce, row // (len(batch["labels"]) // clients), clients)

    def loss_count(self, batch: dict[str, torch.Tensor], clients: int = 1) -> torch.Tensor:
        """[clients]: each client's answer tokens (the targets `answer_token_losses` covers)."""
        return (batch["labels"][:, 1:] != IGNORE).reshape(clients, -1).sum(1)

    def features(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The frozen LM's last hidden state mean-pooled over the prompt (the positions that are no target)."""
        prompt = (batch["attention_mask"] == 1) & (batch["labels"] == IGNORE)
        return model.features(batch["input_ids"], batch["attention_mask"], pool_mask=prompt)

    def rates(self, sums: dict[str, float]) -> dict[str, float]:
        """Accuracy and mean loss per example, the answer perplexity exp(answer-token loss / tokens), and where the
        rows have subjects the accuracy per subject and category (`acc/<subject>`, `acc/category/<category>`)."""
        tokens = max(sums.get("tokens", 0), 1)
        return {**super().rates(sums), "ppl": math.exp(sums.get("token_loss", 0.0) / tokens), **subjects.rates(sums)}

    @torch.no_grad()
    def scores(self, model: nn.Module, batch: dict[str, torch.Tensor], clients: int = 1,
               valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each client's sums: `examples`, `loss` (of each row's mean answer-token loss), `tokens` and
        `token_loss` (answer perplexity = exp(token_loss / tokens)), `correct`; with the rows' `subject` ids,
        `correct@<id>` and `examples@<id>` (celora.tasks.subjects)."""
        labels = batch["labels"]
        n = len(labels)
        ran = None
        if self.accuracy == "likelihood" and "options" in batch:  # the rival options start from this forward's cache
            hidden, cache = decoder_pass(model, batch["input_ids"], batch["attention_mask"])
            ran = prompts_of(hidden, cache, prompt_lengths(batch))
            ce, row = answer_token_losses(model, batch, hidden)
        else:
            ce, row = answer_token_losses(model, batch)
        tokens = per_row(torch.ones_like(ce, dtype=torch.float64), row, n).cpu()
        token_loss = per_row(ce.double(), row, n).cpu()
        correct = self.correct(model, batch, answer_loglik=-token_loss, ran=ran).cpu()
        valid = torch.ones(clients, n // clients, dtype=torch.bool) if valid is None else valid.cpu()
        v = valid.reshape(-1)
        by_client = lambda x: (x * v).view(clients, -1).sum(1)  # noqa: E731
        out = {"examples": valid.sum(1), "loss": by_client(token_loss / tokens.clamp_min(1)),
               "tokens": by_client(tokens), "token_loss": by_client(token_loss), "correct": by_client(correct)}
        if "subject" in batch:  # a benchmark's rows: accuracy per subject too
            out.update(subjects.counts(correct, batch["subject"].cpu(), valid, clients))
        return out

    def correct(self, model: nn.Module, batch: dict[str, torch.Tensor], answer_loglik: torch.Tensor | None = None,
                ran: Prompts | None = None) -> torch.Tensor:
        """[rows] bool: whether each row's answer is found, by `accuracy`. `answer_loglik` ([rows], optional):
        the log-likelihood of each row's own answer, already known from scoring it, so likelihood accuracy
        computes only the other options'; `ran` (optional): the rows' prompts already run (the batch's own
        forward, with its KV cache), so the options need no prompt forward of their own."""
        prompts, answers = split_rows(batch)
        if self.accuracy == "likelihood":
            if "options" not in batch:
                raise InputError("task.accuracy=likelihood needs a closed label set (the dataset's options); "
                                 "use task.accuracy=generate for open answers")
            options = row_options(batch)
            if answer_loglik is None:
                best = option_loglik(model, prompts, options, _pad(batch)).argmax(1)
                return torch.tensor([options[k][b] == a for k, (b, a) in enumerate(zip(best.tolist(), answers))])
            # the others' likelihoods; the answer is found when none of them is higher than its own
            others = [[o if o != a else [] for o in opts] for opts, a in zip(options, answers)]
            if not any(o for opts in others for o in opts):  # no rivals: found when listed
                rival = torch.full((len(others),), -math.inf, dtype=torch.float64)
            else:
                ran = run_prompts(model, prompts, _pad(batch)) if ran is None else ran
                rival = option_logliks(model, ran, others).max(1).values
            listed = torch.tensor([a in opts for opts, a in zip(options, answers)])
            return listed & (answer_loglik.cpu().double() >= rival)
        tok = self.tokenizer
        eos = None if tok is None else tok.eos_token_id
        generated = greedy(model, prompts, self.max_new_tokens, eos, _pad(batch))
        if tok is None:  # token-level comparison when no tokenizer is at hand
            return torch.tensor([g == cut_at_eos(a, eos) for g, a in zip(generated, answers)])
        text = lambda t: tok.decode(t, skip_special_tokens=True)  # noqa: E731
        return torch.tensor([exact_match(text(g), text(cut_at_eos(a, eos))) for g, a in zip(generated, answers)])


def _pad(batch: dict[str, torch.Tensor]) -> int:
    """The padding id: any id right of the attention mask, or 0 when no row is padded (never attended)."""
    padded = batch["input_ids"][batch["attention_mask"] == 0]
    return int(padded[0]) if len(padded) else 0


def prompt_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[rows]: each row's prompt length (its first labelled position, as in split_rows), on the batch's device."""
    labelled = batch["labels"] != IGNORE
    return torch.where(labelled.any(1), labelled.int().argmax(1), batch["attention_mask"].sum(1))


def split_rows(batch: dict[str, torch.Tensor]) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, answers) as token lists: a row's answer starts at its first labelled position."""
    prompts, answers = [], []
    for ids, mask, lab in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["labels"].tolist()):
        length = sum(mask)
        start = next((t for t in range(length) if lab[t] != IGNORE), length)
        prompts.append(ids[:start])
        answers.append(ids[start:length])
    return prompts, answers


def greedy(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, eos: int | None, pad_id: int) -> list[list[int]]:
    """Greedy continuations of every prompt, each cut at its first EOS: transformers' `generate` with the KV
    cache over one left-padded batch, whose rows keep their places (a stacked cohort's client blocks)."""
    return [cut_at_eos(g, eos) for g in generate(model, prompts, max_new_tokens, eos, pad_id)]
