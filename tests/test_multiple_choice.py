"""dataset=multiple_choice (MMLU's format) on tiny_llama: both layouts of the choices and both kinds of answer read
to the same questions; accuracy by option likelihood is exact for a model forced to the right letters or to A;
accuracy per subject and category equals the hand count, one client or a stacked cohort; bad rows refused by
message; a federated round writes the per-subject metrics."""
from __future__ import annotations

import copy
import csv
import functools
import json

import pytest
import torch
from torch import nn

from celora.data.batches import IGNORE, AnswerCollate
from celora.data.multiple_choice import LETTERS, MMLU_CATEGORIES, load_categories, multiple_choice
from celora.errors import ConfigError, InputError
from celora.fl.evaluation import evaluate, evaluate_cohort
from celora.tasks.instruct import Instruct
from tolerance import deep_tol

pytestmark = pytest.mark.usefixtures("one_thread")

SUBJECTS = ["abstract_algebra", "philosophy", "marketing"]  # one of each of three MMLU categories


def _rows(count: int, offset: int = 0) -> list[dict]:
    """MMLU's hub schema: question, subject, choices (2 to 5 here), answer (a 0-based index)."""
    out = []
    for i in range(offset, offset + count):
        n = 2 + i % 4
        out.append({"question": f"Question {i}: which one, {'really, ' * (i % 3)}is right?",
                    "subject": SUBJECTS[i % 3], "choices": [f"option {j} of {i}" for j in range(n)],
                    "answer": (i * 7) % n})
    return out


TRAIN, TEST = _rows(24), _rows(18, offset=100)


@functools.lru_cache(maxsize=None)
def _backbone():
    from celora.models.llm import tiny_llama

    return tiny_llama(seed=0)


def _write(folder, stem: str, rows: list[dict], layout: str, answers: str) -> str:
    """`rows` as a jsonl with a `choices` list column, or a csv with columns A-E (empty past a row's last
    choice); answers as indices or letters."""
    answer = (lambda r: r["answer"]) if answers == "index" else (lambda r: LETTERS[r["answer"]])  # noqa: E731
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "list":
        path = folder / f"{stem}.jsonl"
        path.write_text("".join(json.dumps({**r, "answer": answer(r)}) + "\n" for r in rows))
        return str(path)
    path = folder / f"{stem}.csv"
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["question", *LETTERS[:5], "answer", "subject"])
        for r in rows:
            out.writerow([r["question"], *(r["choices"] + [""] * 5)[:5], answer(r), r["subject"]])
    return str(path)


def _load(folder, layout: str = "list", answers: str = "index", train=TRAIN, test=TEST, **kw):
    files = {split: _write(folder, split, rows, layout, answers) for split, rows in (("train", train), ("test", test))}
    columns = {} if layout == "list" else {"choices_column": list(LETTERS[:5])}
    return multiple_choice(tokenizer=_backbone().tokenizer, max_length=kw.pop("max_length", 128), seed=0,
                           path="json" if layout == "list" else "csv", data_files=files,
                           cache_dir=str(folder / "cache"), **{**columns, **kw})


def test_both_layouts_and_both_answer_kinds_read_to_the_same_questions(tmp_path):
    seen = []
    for layout in ("list", "columns"):
        for answers in ("index", "letter"):
            data = _load(tmp_path / f"{layout}-{answers}", layout, answers)
            columns = ("prompt", "answer", "options", "label", "subject", "input_ids", "option_ids")
            seen.append(data.test.select_columns(list(columns))[:])
    assert all(s == seen[0] for s in seen[1:])
    test = seen[0]
    assert test["prompt"][2] == ("The following is a multiple choice question about abstract algebra.\n\n"  # i = 102
                                 "Question 102: which one, is right?\nA. option 0 of 102\nB. option 1 of 102\n"
                                 "C. option 2 of 102\nD. option 3 of 102\nAnswer:")
    assert test["answer"] == [LETTERS[r["answer"]] for r in TEST] and test["answer"][2] == "C"
    assert test["options"] == [list(LETTERS[:len(r["choices"])]) for r in TEST]
    assert data.label_names == sorted(SUBJECTS) and test["label"] == test["subject"]
    assert [data.label_names[s] for s in test["subject"]] == [r["subject"] for r in TEST]
    tok = _backbone().tokenizer
    ids, targets, options, subject = data.encoded("test")[2]
    assert options == [tok(x, add_special_tokens=False).input_ids + [tok.eos_token_id] for x in "ABCD"]
    assert [t for t in targets if t != IGNORE] == options[2] and data.label_names[subject] == "abstract_algebra"
    # a prompt too long for max_length loses its start: the choices and "Answer:" stay
    short = _load(tmp_path / "short", max_length=48)
    prompt = short.test[2]["input_ids"][:-2]
    assert short.test[2]["prompt_cut"] and len(short.test[2]["input_ids"]) == 48
    assert tok.decode(prompt).endswith("D. option 3 of 102\nAnswer:<|im_end|>\n<|im_start|>assistant\n")


# ---------------------------------------------------------------- accuracy of forced models


class Forced(nn.Module):
    """An lm_head that puts (nearly) all mass on one token: on `tokens[k]` where the hidden state is `keys[k]`
    (the last prompt position of row k), else on `default`. The rest of the model runs as it is."""

    def __init__(self, vocab: int, default: int, keys: torch.Tensor | None = None, tokens: list[int] | None = None):
        super().__init__()
        self.vocab, self.default = vocab, default
        self.keys = keys if keys is not None else torch.empty(0, 1, dtype=torch.float64)
        self.tokens = torch.tensor(tokens or [], dtype=torch.long)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        chosen = torch.full((len(hidden),), self.default, dtype=torch.long)
        if len(self.keys):
            distance = torch.cdist(hidden.double(), self.keys)
            nearest = distance.min(1)
            found = nearest.values <= deep_tol(float(self.keys.norm(dim=1).max()), torch.float64)
            chosen = torch.where(found, self.tokens[nearest.indices], chosen)
        logits = torch.full((len(hidden), self.vocab), -30.0, dtype=hidden.dtype)
        logits[torch.arange(len(hidden)), chosen] = 0.0
        return logits


def _model(head=None) -> nn.Module:
    model = copy.deepcopy(_backbone().classifier(0, seed=0)).double()
    if head is not None:
        model.lm.set_output_embeddings(head)
    return model


def _letter(x: str) -> int:
    return _backbone().tokenizer(x, add_special_tokens=False).input_ids[0]


def _always(letter: str) -> nn.Module:
    return _model(Forced(_backbone().lm.config.vocab_size, _letter(letter)))


def _oracle(rows) -> nn.Module:
    """The model forced to each row's right letter, after that row's prompt (EOS after any letter)."""
    model = _model()
    keys, tokens = [], []
    for i in range(len(rows)):
        ids, targets, _, _ = rows[i]
        start = next(t for t, y in enumerate(targets) if y != IGNORE)
        with torch.no_grad():
            keys.append(model.hidden(torch.tensor([ids[:start]]), torch.ones(1, start, dtype=torch.long))[0, -1])
        tokens.append(targets[start])
    eos = _backbone().tokenizer.eos_token_id
    model.lm.set_output_embeddings(Forced(_backbone().lm.config.vocab_size, eos, torch.stack(keys), tokens))
    return model


def _score(model, rows, indices=None, clients=None):
    collate, task = AnswerCollate(_backbone().tokenizer.pad_token_id), Instruct()
    if clients is None:
        return task.rates(evaluate(model, rows, indices or range(len(rows)), 5, collate, task))
    return [task.rates(s) for s in evaluate_cohort(model, rows, clients, 5, collate, task)]


def _hand(rows: list[dict], correct) -> dict[str, float]:
    """Accuracy, per subject and per MMLU category, counted by hand."""
    categories = load_categories(str(MMLU_CATEGORIES))
    out = {"acc": sum(map(correct, rows)) / len(rows)}
    for s in SUBJECTS:
        mine = [r for r in rows if r["subject"] == s]
        out[f"acc/{s}"] = sum(map(correct, mine)) / len(mine)
        category = next(c for c, members in categories.items() if s in members)
        out[f"acc/category/{category}"] = out[f"acc/{s}"]  # one subject of each category here
    return out


def test_forced_models_score_exactly_and_per_subject_and_category_by_hand(tmp_path):
    data = _load(tmp_path, categories=str(MMLU_CATEGORIES))
    rows = data.encoded("test")
    is_a = lambda r: r["answer"] == 0  # noqa: E731
    assert 0 < sum(map(is_a, TEST)) < len(TEST)
    right = _score(_oracle(rows), rows)
    assert right["acc"] == 1.0 and all(right[k] == 1.0 for k in _hand(TEST, is_a))
    always_a = _score(_always("A"), rows)
    expected = _hand(TEST, is_a)
    assert {k: always_a[k] for k in expected} == expected
    assert set(always_a) == {"acc", "loss", "ppl", *expected}  # STEM, humanities, other: no social sciences rows
    assert {"acc/category/STEM", "acc/category/humanities", "acc/category/other"} <= set(always_a)


def test_a_stacked_cohort_counts_each_clients_subjects_by_hand(tmp_path):
    data = _load(tmp_path, categories=str(MMLU_CATEGORIES))
    rows = data.encoded("test")
    clients = [list(range(0, 11)), list(range(11, 18))]  # uneven: the short client's block is padded (not counted)
    is_a = lambda r: r["answer"] == 0  # noqa: E731
    for rates, mine in zip(_score(_always("A"), rows, clients=clients), clients):
        expected = _hand([TEST[i] for i in mine], is_a)
        assert {k: rates[k] for k in expected} == expected
    assert _score(_always("A"), rows, indices=clients[1])["acc/marketing"] == expected["acc/marketing"]


# ---------------------------------------------------------------- bad input


def test_bad_rows_and_columns_are_refused_by_message(tmp_path):
    def bad(index: int, **change) -> list[dict]:
        rows = copy.deepcopy(TRAIN)
        rows[index].update(change)
        return rows

    rules = r"0-based index \(0 is A\) or a letter, naming one of the row's 2 to 26 choices"
    with pytest.raises(InputError, match=rf"(?s)cannot be asked as multiple-choice questions:\n  - split 'train': 1 of "
                                         rf"24 rows \(rows 3 \(answer 5 of 5 choices\)\)\nThe answer .* is a {rules}"):
        _load(tmp_path / "a", train=bad(3, answer=5))
    with pytest.raises(InputError, match=r"rows 2 \(answer 'E' of 4 choices\)"):
        _load(tmp_path / "b", answers="letter", train=bad(2, answer=4, choices=TRAIN[2]["choices"][:4]))
    with pytest.raises(InputError, match=r"rows 0 \(1 choice\)"):
        _load(tmp_path / "c", train=bad(0, choices=["alone"]))
    with pytest.raises(InputError, match=r"rows 5 \(choice B empty\)"):
        _load(tmp_path / "d", layout="columns", train=bad(5, choices=["one", "", "three"]))
    with pytest.raises(InputError, match=r"column\(s\) \['query'\] not in json.*Set dataset.question_column"):
        _load(tmp_path / "e", question_column="query")
    with pytest.raises(InputError, match=r"column\(s\) \['F'\] not in csv.*dataset.choices_column"):
        _load(tmp_path / "f", layout="columns", choices_column=list("ABCDEF"))
    with pytest.raises(InputError, match=r"categories names none of the data's subjects \(abstract_algebra, "
                                         r"marketing, philosophy\)"):
        _load(tmp_path / "g", categories={"STEM": ["physics"]})
    with pytest.raises(ConfigError, match=r"dataset.subject_column=null"):
        _load(tmp_path / "h", categories=str(MMLU_CATEGORIES), subject_column=None)
    with pytest.raises(InputError, match=r"dataset.categories='nowhere.yaml' is not a file.*mmlu_categories.yaml"):
        _load(tmp_path / "i", categories="nowhere.yaml")


# ---------------------------------------------------------------- a federated round


def test_a_federated_round_logs_accuracy_per_subject_and_category(compose_cfg, tmp_path):
    from celora.run import run

    files = {s: _write(tmp_path, s, rows, "list", "index") for s, rows in (("train", TRAIN), ("test", TEST))}
    run(compose_cfg("+debug=tiny_llm", "dataset=multiple_choice", "dataset.path=json", "partition=iid",
                    f"dataset.data_files={{train: {files['train']}, test: {files['test']}}}", "dataset.limit=null",
                    f"dataset.categories={MMLU_CATEGORIES}", f"dataset.cache_dir={tmp_path / 'cache'}", "fl.rounds=1"),
        run_dir=tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    last = rows[-1]
    keys = [f"global/acc/{s}" for s in SUBJECTS] + [f"global/acc/category/{c}" for c in ("STEM", "humanities", "other")]
    assert all(0 <= last[k] <= 1 for k in keys), sorted(last)
    personal = [k for k in last if k.startswith("personal/acc/")]  # the subjects of the clients' local test rows
    assert personal and all(0 <= last[k] <= 1 for k in personal)
