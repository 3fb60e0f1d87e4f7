"""Does an exported personal adapter answer as celora's own model of that client does? On the real model.

    .venv/bin/python scripts/check_export.py RUN_DIR --client 4     # after python -m celora.export RUN_DIR

For the run's causal LM: the client's model inside celora (the run's checkpoint, its states) and the base model
loaded by transformers with the exported folder loaded by peft, asked the client's own test questions; each
picks the option (of the task's closed answer set) of highest log-likelihood, with the same scoring function.
Prints how many answers agree, each one's accuracy, and the largest difference of the log-likelihoods.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def check(run_dir: str, client: int, folder: str | None = None, batch: int = 8) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from celora.export.source import open_run
    from celora.models.llm import LanguageModel
    from celora.tasks.instruct import _pad, option_loglik, row_options, split_rows
    from celora.tensors import load

    trained = open_run(run_dir)
    sim = trained.sim
    folder = Path(folder or Path(run_dir) / "export" / f"round_{trained.round}" / "peft" / f"client_{client}")
    facts = json.loads((folder / "celora.json").read_text())
    load(sim.model, sim.states.of(client))
    base = AutoModelForCausalLM.from_pretrained(facts["base_model"], dtype=next(sim.model.parameters()).dtype)
    exported = LanguageModel(PeftModel.from_pretrained(base, str(folder))).eval()
    rows = sim.clients[client].test  # its local test rows: held out of the train split, as a run scores them
    agree, right, theirs_right, gap = 0, 0, 0, 0.0
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            b = sim.collate([sim.train_data[int(i)] for i in rows[start:start + batch]])  # local test rows
            prompts, answers = split_rows(b)
            options = row_options(b)
            ours = option_loglik(sim.model, prompts, options, _pad(b))
            theirs = option_loglik(exported, prompts, options, _pad(b))
            gap = max(gap, float((ours - theirs).abs().nan_to_num(0).max()))
            for k, (o, t) in enumerate(zip(ours.argmax(1).tolist(), theirs.argmax(1).tolist())):
                agree += o == t
                right += options[k][o] == answers[k]
                theirs_right += options[k][t] == answers[k]
    n = len(rows)
    return {"client": client, "questions": n, "same_answer": agree, "celora_acc": right / n,
            "exported_acc": theirs_right / n, "max_loglik_diff": gap, "seconds": round(time.perf_counter() - t0, 1)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--client", type=int, default=0)
    ap.add_argument("--folder", help="the exported folder (default: RUN_DIR/export/round_<last>/peft/client_<i>)")
    args = ap.parse_args()
    print(json.dumps(check(args.run_dir, args.client, args.folder)))
