"""Multiple-choice benchmarks in MMLU's format for causal LMs: each question asked with its lettered choices and
answered by the letter. A row's letters are its options (task.accuracy=likelihood picks the likeliest), its
subject is its class and what accuracy is broken down by, per category too given a mapping of categories to
subjects (MMLU's: mmlu_categories.yaml beside this file)."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import string
from pathlib import Path

import datasets
import yaml
from datasets.fingerprint import Hasher

from celora.data.columns import SHOWN
from celora.data.instruct import InstructData, cache_root, tokenised
from celora.data.splits import Limit, TestFraction
from celora.data.text import cached, read_source, train_and_test
from celora.errors import ConfigError, InputError, MissingFile

log = logging.getLogger(__name__)

_CACHE_VERSION = 1  # bump when the prompt or the reading of a row changes
LETTERS = string.ascii_uppercase  # choice k is answered by the k-th letter: 2 to 26 choices a row
MMLU_CATEGORIES = Path(__file__).with_name("mmlu_categories.yaml")  # MMLU's 57 subjects in its 4 categories
RULES = ("The answer (dataset.answer_column) is a 0-based index (0 is A) or a letter, naming one of the row's 2 to "
         "26 choices (dataset.choices_column: one column of lists, or one column per choice, e.g. [A, B, C, D]); "
         "a row's choices end at its last non-empty one.")


def prompt(question: str, choices: list[str], subject: str | None) -> str:
    """MMLU's prompt: what it is about (a subject's underscores read as spaces), the question, the choices
    lettered A, B, ..., then "Answer:"."""
    about = f" about {subject.replace('_', ' ')}" if subject else ""
    lettered = "".join(f"\n{LETTERS[k]}. {c}" for k, c in enumerate(choices))
    return f"The following is a multiple choice question{about}.\n\n{question}{lettered}\nAnswer:"


def answer_index(value, n: int) -> int | None:
    """The 0-based choice an answer names, an index (an integer, or its digits) or a letter (either case); None
    where it names none of the row's `n` choices."""
    if isinstance(value, float) and value.is_integer():  # a numeric column that once held blanks
        value = int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit():
            value = int(text)
        elif len(text) == 1 and text.upper() in LETTERS:
            value = LETTERS.index(text.upper())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n:
        return value
    return None


def _empty(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip()


def row_choices(values) -> tuple[list[str], str | None]:
    """(a row's choices: its values up to the last non-empty one, as text; what is wrong with them, or None)."""
    if not isinstance(values, list | tuple):
        return [], f"choices {str(values)[:20]!r} are not a list"
    values = list(values)
    while values and _empty(values[-1]):
        values.pop()
    if len(values) < 2:
        return [], f"{len(values)} choice{'s' * (len(values) != 1)}"
    if len(values) > len(LETTERS):
        return [], f"{len(values)} choices"
    gap = next((k for k, v in enumerate(values) if _empty(v)), None)
    if gap is not None:
        return [], f"choice {LETTERS[gap]} empty"
    return [str(v).strip() for v in values], None


def ask(ds: datasets.Dataset, question_column: str, choices_column: str | list[str], answer_column: str,
        subject_column: str | None) -> tuple[dict[str, list], list[str]]:
    """(the rows as `prompt`, `answer` (a letter), `options` (the row's letters), `subject`; a description of each
    row that cannot be asked: its number in the split and what is wrong)."""
    n = len(ds)
    questions = ds[question_column]
    if isinstance(choices_column, str):
        choices = ds[choices_column]
    else:
        choices = zip(*(ds[c] for c in choices_column))
    answers = ds[answer_column]
    subjects = ds[subject_column] if subject_column else [None] * n
    rows: dict[str, list] = {"prompt": [], "answer": [], "options": [], "subject": []}
    bad = []
    for k, (q, c, a, s) in enumerate(zip(questions, choices, answers, subjects)):
        texts, problem = row_choices(c)
        index = answer_index(a, len(texts)) if problem is None else None
        if problem is None and index is None:
            problem = f"answer {a!r} of {len(texts)} choices"
        if problem is not None:
            bad.append(f"{k} ({problem})")
            continue
        subject = None if s is None else str(s).strip()
        rows["prompt"].append(prompt(str(q).strip(), texts, subject))
        rows["answer"].append(LETTERS[index])
        rows["options"].append(list(LETTERS[:len(texts)]))
        rows["subject"].append(subject)
    return rows, bad


def load_categories(categories: dict[str, list[str]] | str | None) -> dict[str, list[str]] | None:
    """dataset.categories as a mapping category -> its subjects: given as one, or read from a json or yaml file."""
    if not isinstance(categories, str):
        given = categories
    elif not Path(categories).is_file():
        raise MissingFile(f"dataset.categories={categories!r} is not a file: give a json or yaml file mapping each "
                          f"category to its subjects (MMLU's: {MMLU_CATEGORIES}), or the mapping itself.")
    else:
        text = Path(categories).read_text()
        try:
            given = json.loads(text) if categories.endswith(".json") else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as e:
            raise InputError(f"dataset.categories={categories!r} is not valid json or yaml: {e}") from None
    if given is None:
        return None
    if not (isinstance(given, dict) and all(isinstance(v, list) and all(isinstance(s, str) for s in v)
                                            for v in given.values())):
        raise InputError(f"dataset.categories must map each category to a list of subjects, e.g. {{STEM: "
                         f"[abstract_algebra, astronomy], humanities: [philosophy]}}; got {str(given)[:80]}")
    return {str(name): list(members) for name, members in given.items()}


def check_categories(categories: dict[str, list[str]], subjects: list[str], source: str) -> None:
    """Refuses a mapping that names none of the data's subjects (a mistake); logs the subjects it leaves out."""
    mapped = {s for members in categories.values() for s in members}
    outside = [s for s in subjects if s not in mapped]
    if len(outside) == len(subjects):
        raise InputError(f"{source}: dataset.categories names none of the data's subjects "
                         f"({', '.join(subjects[:SHOWN])}{', ...' * (len(subjects) > SHOWN)}): map categories to "
                         "the values of dataset.subject_column, or set dataset.categories=null.")
    if outside:
        log.warning("%s: %d subjects are in no category of dataset.categories (only their own accuracy counts "
                    "them): %s", source, len(outside), ", ".join(outside))


def multiple_choice(*, tokenizer, max_length: int, seed: int, path: str, name: str | None = None, data_files=None,
                    split_train: str = "train", split_test: str | None = "test", question_column: str = "question",
                    choices_column: str | list[str] = "choices", answer_column: str = "answer",
                    subject_column: str | None = "subject", categories: dict[str, list[str]] | str | None = None,
                    test_fraction: TestFraction = 0.1, limit: Limit = None, cache_dir: str | None = None,
                    drop_missing: bool = False) -> InstructData:
    """Multiple-choice questions in MMLU's format from any `datasets.load_dataset` source (a hub id such as
    cais/mmlu, or json/jsonl/csv/parquet with `data_files`): a question, its choices (one column of lists, or
    one column per choice), the answer as a 0-based index or a letter, and optionally a subject.

    Each row is asked with MMLU's prompt (`prompt`) and answered by its letter; its options are its letters, so
    rows of 2 to 26 choices mix. The subject is the row's class (partition by label; or partition=natural with
    partition.column=subject) and accuracy is reported per subject, and per category with `categories` (a
    mapping category -> subjects, or a json/yaml file of one). A prompt too long for `max_length` loses its
    start, so the choices stay. A row missing a question, answer or subject is refused with its row number
    (dropped with `drop_missing`), as is one with fewer than 2 choices or an answer that names none of them."""
    if categories is not None and subject_column is None:
        raise ConfigError("dataset.categories groups subjects, but dataset.subject_column=null: name the subject "
                          "column, or set dataset.categories=null.")
    groups = load_categories(categories)
    lists = isinstance(choices_column, str)
    roles = {question_column: "dataset.question_column", answer_column: "dataset.answer_column",
             **({choices_column: "dataset.choices_column"} if lists else {}),
             **({subject_column: "dataset.subject_column"} if subject_column else {})}
    splits = read_source(path, name, data_files, split_train, split_test, roles, drop_missing, test_fraction)
    if not lists:  # one column per choice: a row may leave the last ones empty, so they are not `roles`
        missing = [c for c in choices_column if any(c not in ds.column_names for ds in splits)]
        if missing:
            raise InputError(f"column(s) {missing} not in {path}; its columns are {splits[0].column_names}. Set "
                             "dataset.choices_column to existing ones: one column of lists, or one column per choice.")
    source = f"dataset {path}"
    key = Hasher.hash(("multiple_choice", _CACHE_VERSION, [ds._fingerprint for ds in splits], path, name, split_train,
                       split_test, question_column, choices_column, answer_column, subject_column, test_fraction,
                       limit, seed, drop_missing))

    def build() -> datasets.DatasetDict:
        asked = [ask(ds, question_column, choices_column, answer_column, subject_column) for ds in splits]
        problems = [f"  - split {split!r}: {len(bad):,} of {len(ds):,} rows (rows {', '.join(bad[:SHOWN])}"
                    f"{', ...' if len(bad) > SHOWN else ''})"
                    for split, ds, (_, bad) in zip((split_train, split_test), splits, asked) if bad]
        if problems:
            raise InputError(f"{source}: rows that cannot be asked as multiple-choice questions:\n" +
                             "\n".join(problems) + f"\n{RULES} Row numbers count from 0 within the split. Fix or drop "
                             "those rows.")
        names = sorted({s for rows, _ in asked for s in rows["subject"]}) if subject_column else ["all"]
        classes = datasets.ClassLabel(names=names)
        features = datasets.Features({"prompt": datasets.Value("string"), "answer": datasets.Value("string"),
                                      "options": datasets.Sequence(datasets.Value("string")), "label": classes,
                                      "task": datasets.Value("int64"),
                                      **({"subject": classes} if subject_column else {})})
        index = {s: k for k, s in enumerate(names)}
        parts = []
        for rows, _ in asked:
            label = [index[s] for s in rows["subject"]] if subject_column else [0] * len(rows["prompt"])
            columns = {"prompt": rows["prompt"], "answer": rows["answer"], "options": rows["options"], "label": label,
                       "task": [0] * len(label), **({"subject": label} if subject_column else {})}
            parts.append(datasets.Dataset.from_dict(columns, features=features))
        return train_and_test(parts, limit, test_fraction, seed)

    data = tokenised(cached(cache_root(cache_dir), f"multiple_choice-{key}", build), tokenizer, max_length, None,
                     source, cut="start")
    if groups is not None:
        check_categories(groups, data.label_names, source)
    return dataclasses.replace(data, categories=groups)
