"""FlowerTune's evaluation sets that the flowertune presets cannot read from the hub as they are, written as local
jsonl files the presets read (docs/flowertune.md): finance's FPB, FiQA and TFNS as Alpaca-format sentiment questions
(instruction, input, output: negative / neutral / positive), medical's PubMedQA as yes / no / maybe questions, and
MedQA and CareQA in MMLU's format (question, choices, answer: a 0-based index). Each set holds the rows FlowerTune's
evaluation code scores (flwrlabs/flower, benchmarks/flowertune-llm/evaluation/<challenge>/benchmarks.py and utils.py:
the same splits, the same 25% drawn with seed 42, the same labels and instructions). MMLU (general) and MedMCQA
(medical) the presets read from the hub directly.

    python -m scripts.flowertune_data finance medical                  # needs a network once -> data/flowertune/
    python -m scripts.flowertune_data finance --source fpb=fpb.parquet  # a set from a local file in the hub's schema

A --source file holds the rows the hub gives before FlowerTune's selection: FPB's train split (sentence, label),
FiQA's train, validation and test splits one after the other (sentence, sentiment_score, format), TFNS's validation
split (text, label), PubMedQA's test split (QUESTION, CONTEXTS, final_decision), MedQA's test split (question,
options: [{key, value}], answer), CareQA's test split (question, op1-op4, cop: 1-based); json, jsonl, csv or parquet.
Training never downloads: run this once, then the presets read data/flowertune/<set>.jsonl (from the checkout's root;
elsewhere, eval_sets.<set>.dataset.data_files.train=<file>).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets

SENTIMENT = ["negative", "neutral", "positive"]  # the answers of every finance set (dataset.options)
NEWS = "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
TWEET = "What is the sentiment of this tweet? Please choose an answer from {negative/neutral/positive}."
# FlowerTune's medical instructions (from Meditron's evaluation); MedQA's and CareQA's go with their questions in
# FlowerTune's prompt, which celora's MMLU prompt replaces (docs/flowertune.md)
PUBMEDQA = ("As an expert doctor in clinical science and medical knowledge, can you tell me if the following "
            "statement is correct? Answer yes, no, or maybe.")
HELD_OUT, SEED = 0.25, 42  # FlowerTune scores this share of FPB and FiQA, drawn with this seed


def fpb(ds: datasets.Dataset) -> list[dict]:
    """takala/financial_phrasebank (sentences_50agree): label 0 negative, 1 neutral, 2 positive."""
    return [{"instruction": NEWS, "input": s, "output": SENTIMENT[y]} for s, y in zip(ds["sentence"], ds["label"])]


def fiqa_label(score: float) -> str:
    """FiQA's sentiment score in [-1, 1] as a class, at FlowerTune's thresholds."""
    return "negative" if score < -0.1 else "neutral" if score < 0.1 else "positive"


def fiqa(ds: datasets.Dataset) -> list[dict]:
    """pauri32/fiqa-2018: a post is a tweet, anything else news."""
    return [{"instruction": TWEET if f == "post" else NEWS, "input": s, "output": fiqa_label(v)}
            for s, v, f in zip(ds["sentence"], ds["sentiment_score"], ds["format"])]


def tfns(ds: datasets.Dataset) -> list[dict]:
    """zeroshot/twitter-financial-news-sentiment: label 0 bearish, 1 bullish, 2 neutral."""
    names = {0: "negative", 1: "positive", 2: "neutral"}
    return [{"instruction": TWEET, "input": t, "output": names[y]} for t, y in zip(ds["text"], ds["label"])]


def pubmedqa(ds: datasets.Dataset) -> list[dict]:
    """bigbio/pubmed_qa (pubmed_qa_labeled_fold0_source): the abstract's contexts, then the question."""
    return [{"instruction": PUBMEDQA, "input": "\n".join(c) + "\n" + q, "output": a}
            for q, c, a in zip(ds["QUESTION"], ds["CONTEXTS"], ds["final_decision"])]


def medqa(ds: datasets.Dataset) -> list[dict]:
    """bigbio/med_qa (med_qa_en_4options_source): the answer is the option whose text is the answer's."""
    out = []
    for q, options, a in zip(ds["question"], ds["options"], ds["answer"]):
        texts = [o["value"] for o in options]
        out.append({"question": q, "choices": texts, "answer": texts.index(a) if a in texts else None})
    return out


def careqa(ds: datasets.Dataset) -> list[dict]:
    """HPAI-BSC/CareQA (CareQA_en): cop counts the choices from 1."""
    return [{"question": q, "choices": list(c), "answer": int(k) - 1}
            for q, *c, k in zip(ds["question"], ds["op1"], ds["op2"], ds["op3"], ds["op4"], ds["cop"])]


@dataclass(frozen=True)
class Set:
    """Where a set is on the hub, which of its rows FlowerTune scores, and how a row is asked."""

    hub: str
    name: str | None
    splits: tuple[str, ...]  # read one after the other
    rows: Callable[[datasets.Dataset], list[dict]]
    held_out: bool = False  # FlowerTune scores a seeded 25% of them


SETS = {
    "fpb": Set("takala/financial_phrasebank", "sentences_50agree", ("train",), fpb, held_out=True),
    "fiqa": Set("pauri32/fiqa-2018", None, ("train", "validation", "test"), fiqa, held_out=True),
    "tfns": Set("zeroshot/twitter-financial-news-sentiment", None, ("validation",), tfns),
    "pubmedqa": Set("bigbio/pubmed_qa", "pubmed_qa_labeled_fold0_source", ("test",), pubmedqa),
    "medqa": Set("bigbio/med_qa", "med_qa_en_4options_source", ("test",), medqa),
    "careqa": Set("HPAI-BSC/CareQA", "CareQA_en", ("test",), careqa),
}
CHALLENGES = {"finance": ("fpb", "fiqa", "tfns"), "medical": ("pubmedqa", "medqa", "careqa")}


def from_hub(s: Set) -> datasets.Dataset:
    """The set's splits, concatenated. A repo with a loading script (bigbio's) is read from the hub's parquet export,
    since `datasets` 4 runs no scripts."""
    def read(revision: str | None) -> datasets.Dataset:
        return datasets.concatenate_datasets([datasets.load_dataset(s.hub, s.name, split=split, revision=revision)
                                              for split in s.splits])
    try:
        return read(None)
    except Exception as first:  # noqa: BLE001  (any failure of the first way: the export is the second)
        try:
            return read("refs/convert/parquet")
        except Exception:  # noqa: BLE001
            raise SystemExit(f"{s.hub} ({s.name or 'default'}, {'+'.join(s.splits)}) could not be read: {first}. "
                             "Download it in the hub's schema and give --source <set>=<file>.") from None


def from_file(path: Path) -> datasets.Dataset:
    if not path.is_file():
        raise SystemExit(f"--source: {path} is not a file")
    kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
    if kind is None:
        raise SystemExit(f"--source: {path} is not json, jsonl, csv or parquet")
    return datasets.load_dataset(kind, data_files=str(path), split="train")


def scored(s: Set, ds: datasets.Dataset) -> list[dict]:
    """The rows FlowerTune scores, asked as the presets read them."""
    if s.held_out:
        ds = ds.train_test_split(test_size=HELD_OUT, seed=SEED)["test"]
    return s.rows(ds)


def write(name: str, ds: datasets.Dataset, out: Path) -> Path:
    rows = scored(SETS[name], ds)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{name}: {len(rows)} rows -> {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.flowertune_data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("challenges", nargs="+", choices=[*CHALLENGES, *SETS], help="challenges, or single sets")
    ap.add_argument("--out", type=Path, default=Path("data/flowertune"), help="where the jsonl files go")
    ap.add_argument("--source", action="append", default=[], metavar="SET=FILE",
                    help="read SET from FILE (the hub's schema) instead of the hub")
    args = ap.parse_args(argv)
    sources = {}
    for item in args.source:
        name, sep, file = item.partition("=")
        if not sep or name not in SETS:
            raise SystemExit(f"--source {item!r}: give SET=FILE with SET one of {', '.join(SETS)}")
        sources[name] = Path(file)
    for name in dict.fromkeys(n for c in args.challenges for n in CHALLENGES.get(c, (c,))):
        write(name, from_file(sources[name]) if name in sources else from_hub(SETS[name]), args.out)


if __name__ == "__main__":
    main()
