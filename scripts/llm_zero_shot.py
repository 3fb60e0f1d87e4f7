"""Zero-shot answer accuracy of a causal LM on a fixed slice of dataset=rt_instruct (review-sentiment questions).

    .venv/bin/python scripts/llm_zero_shot.py                 # the embedded SmolLM2-135M-Instruct, 200 questions
    .venv/bin/python scripts/llm_zero_shot.py --model tiny_llama --n 20

The questions are the first `n` rows of rt_instruct's held-out test split (seed 0), asked with the model's chat
template as a run asks them; accuracy is option likelihood over {negative, positive} (task=instruct's default),
scored as the evaluation of a run scores it.
"""
from __future__ import annotations

import argparse
import json
import time

from celora.data.instruct import rt_instruct
from celora.fl.evaluation import evaluate
from celora.tasks.instruct import Instruct


def zero_shot(model_name: str = "smollm2", n: int = 200, batch_size: int = 8) -> dict:
    from celora.models import llm

    start = time.perf_counter()
    backbone = getattr(llm, model_name)(max_length=512)
    loaded = time.perf_counter() - start
    data = rt_instruct(**backbone.data_args(), seed=0)
    if n > len(data.test):
        raise ValueError(f"--n {n}: the test split has {len(data.test)} questions")
    test = data.encoded("test")
    positive = sum(test.classes[i] == data.label_names.index("positive") for i in range(n)) / n
    task, model = Instruct("likelihood"), backbone.classifier(data.num_classes, seed=0)
    start = time.perf_counter()
    sums = evaluate(model, test, range(n), batch_size, backbone.collate(), task)
    rates = task.rates(sums)
    return {"model": model_name, "questions": n, "accuracy": rates["acc"], "answer_ppl": rates["ppl"],
            "positive_share": positive, "load_s": round(loaded, 1), "score_s": round(time.perf_counter() - start, 1)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny_llama"])
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    print(json.dumps(zero_shot(args.model, args.n)))
