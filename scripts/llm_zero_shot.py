"""Zero-shot answer accuracy of a causal LM on a fixed slice of Rotten Tomatoes review-sentiment questions.

    .venv/bin/python scripts/llm_zero_shot.py                 # the embedded SmolLM2-135M-Instruct, 200 questions
    .venv/bin/python scripts/llm_zero_shot.py --model tiny_llama --n 20

The questions are the first `n` reviews of the held-out test split (seed 0), asked with the chat template;
accuracy is option likelihood over {positive, negative} (celora.tasks.instruct).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from celora.data.batches import AnswerCollate
from celora.tasks.instruct import IGNORE, Instruct

QUESTION = "Is this movie review positive or negative? Answer with one word.\n\nReview: {text}"
ANSWERS = {"fresh": "positive", "rotten": "negative"}


def rows(tokenizer, texts: list[str], answers: list[str]) -> list[tuple[list[int], list[int]]]:
    out = []
    for text, answer in zip(texts, answers):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION.format(text=text)}],
                                               add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        a = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        out.append((prompt + a, [IGNORE] * len(prompt) + a))
    return out


def zero_shot(model_name: str = "smollm2", n: int = 200, batch_size: int = 8) -> dict:
    from celora.data.text import rotten_tomatoes
    from celora.models import llm

    start = time.perf_counter()
    backbone = getattr(llm, model_name)()
    loaded = time.perf_counter() - start
    tok = backbone.tokenizer
    data = rotten_tomatoes(tokenizer=tok, max_length=512, seed=0)
    test = data.test.select(range(n))
    answers = [ANSWERS[data.label_names[y]] for y in test["label"][:]]
    examples = rows(tok, list(test["text"]), answers)
    options = [tok(w, add_special_tokens=False).input_ids + [tok.eos_token_id] for w in ("positive", "negative")]
    width = max(len(o) for o in options)
    opts = torch.tensor([o + [IGNORE] * (width - len(o)) for o in options])
    model, task, collate = backbone.classifier(0, seed=0), Instruct("likelihood"), AnswerCollate(tok.pad_token_id)
    correct, start = 0, time.perf_counter()
    with torch.no_grad():
        for i in range(0, n, batch_size):
            batch = collate(examples[i:i + batch_size])
            correct += int(task.correct(model, dict(batch, options=opts)).sum())
    return {"model": model_name, "questions": n, "accuracy": correct / n, "positive_share": answers.count("positive") / n,
            "load_s": round(loaded, 1), "score_s": round(time.perf_counter() - start, 1)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny_llama"])
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    print(json.dumps(zero_shot(args.model, args.n)))
