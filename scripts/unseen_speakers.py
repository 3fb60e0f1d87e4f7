"""Convention sentences of speakers that experiment=llm_default never trains on, as an MMLU-format multiple-choice
file: an eval set of other data than the run's (docs/benchmarks.md).

    python -m scripts.unseen_speakers --out party_unseen.jsonl          # 200 sentences of unseen speakers
    python -m celora experiment=llm_default +dataset@eval_sets.unseen.dataset=multiple_choice \\
      eval_sets.unseen.dataset.path=json 'eval_sets.unseen.dataset.data_files={train: party_unseen.jsonl}' \\
      +eval_sets.unseen.split=all +eval_sets.unseen.personal=true

instruct_mix draws `limit` sentences of the 2012 convention speeches (the same stratified draw, seeded, whatever
else it holds); every speaker of those sentences, in its train or test rows, is seen. The file holds sentences of
the other speakers only, drawn with --seed, each asked as a two-choice question (A Democratic, B Republican).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from celora.data.instruct import PARTY_ANSWERS, convention_sentences, party_source
from celora.data.text import take

QUESTION = "Which party's 2012 national convention is this sentence from?\n\n{sentence}"
SUBJECT = "us_politics"  # one neutral subject: a party's name in the prompt would give the answer away


def seen_speakers(limit: int, seed: int) -> set[int]:
    """The speakers of the convention sentences instruct_mix(limit, seed) holds (its train and test rows)."""
    return set(take(convention_sentences(party_source()), limit, seed)["speaker"])


def unseen_rows(limit: int, seed: int, rows: int, draw_seed: int) -> list[dict]:
    """`rows` sentences (drawn with `draw_seed`) of speakers that instruct_mix(limit, seed) never holds."""
    sentences = convention_sentences(party_source())
    seen = seen_speakers(limit, seed)
    pool = np.flatnonzero([s not in seen for s in sentences["speaker"]])
    picked = np.sort(np.random.default_rng(draw_seed).choice(pool, min(rows, len(pool)), replace=False))
    part = sentences.select(picked)
    return [{"question": QUESTION.format(sentence=t), "choices": list(PARTY_ANSWERS), "answer": int(y),
             "subject": SUBJECT, "speaker": int(s)} for t, y, s in zip(part["text"], part["label"], part["speaker"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("party_unseen.jsonl"))
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--limit", type=int, default=200, help="instruct_mix's dataset.limit (llm_default: 200)")
    ap.add_argument("--seed", type=int, default=0, help="the run's seed (instruct_mix's draw)")
    ap.add_argument("--draw-seed", type=int, default=0, help="which unseen sentences")
    args = ap.parse_args()
    found = unseen_rows(args.limit, args.seed, args.rows, args.draw_seed)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in found))
    print(f"{len(found)} sentences of {len({r['speaker'] for r in found})} unseen speakers -> {args.out}")


if __name__ == "__main__":
    main()
