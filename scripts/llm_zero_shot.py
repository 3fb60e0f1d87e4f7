"""Zero-shot answer accuracy of a causal LM on a fixed slice of dataset=rt_instruct (review-sentiment questions):
one use of `python -m celora.evaluate`.

    .venv/bin/python scripts/llm_zero_shot.py                 # the embedded SmolLM2-135M-Instruct, 200 questions
    .venv/bin/python scripts/llm_zero_shot.py --model tiny_llama --n 20

The same as `python -m celora.evaluate model=smollm2 dataset=rt_instruct model.max_length=512
client.eval_batch_size=8 --rows 200`: the first `n` rows of rt_instruct's held-out test split (seed 0), asked with
the model's chat template as a run asks them; accuracy is option likelihood over {negative, positive}
(task=instruct's default), scored as the evaluation of a run scores it.
"""
from __future__ import annotations

import argparse
import json
import time

from celora.evaluate import prepare, score


def zero_shot(model_name: str = "smollm2", n: int = 200, batch_size: int = 8) -> dict:
    start = time.perf_counter()
    prepared = prepare(f"model={model_name}", ["dataset=rt_instruct", "model.max_length=512",
                                                f"client.eval_batch_size={batch_size}"])
    loaded = time.perf_counter() - start
    test = prepared.sim.test_data
    if n > len(test):
        raise ValueError(f"--n {n}: the test split has {len(test)} questions")
    positive = sum(test.classes[i] == 1 for i in range(n)) / n  # rt_instruct's classes: negative, positive
    row = score(prepared, rows=n)
    return {"model": model_name, "questions": n, "accuracy": row["global/acc"], "answer_ppl": row["global/ppl"],
            "positive_share": positive, "load_s": round(loaded, 1), "score_s": round(row["time/eval_s"], 1)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny_llama"])
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    print(json.dumps(zero_shot(args.model, args.n)))
