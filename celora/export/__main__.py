"""`python -m celora.export RUN_DIR`: a run's global and personal models as PEFT adapters or merged models."""
from __future__ import annotations

import argparse
import logging
import sys

from celora.errors import UserError

DESCRIPTION = """Writes the models of a celora run dir (its kept checkpoints) as folders that peft and transformers
load without celora: PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors) or merged Hugging Face
models, each with a README.md model card. A classifier's head goes beside them (head.safetensors: load it with
celora.export.load_classifier). Details: docs/export.md."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m celora.export", description=DESCRIPTION)
    ap.add_argument("run_dir", help="a run's dir (outputs/<date>/<time>, or one job of multirun/...)")
    ap.add_argument("--round", default="last", help="last (newest intact checkpoint), best (the round of the best "
                                                    "optimized_metric) or a kept round number; default: last")
    ap.add_argument("--models", default="all", help="global, personal, all (what the method has), or client ids "
                                                    "such as 0,3,7; default: all")
    ap.add_argument("--format", default="peft", choices=("peft", "merged"), help="default: peft")
    ap.add_argument("--out", help="where the folders go (default: RUN_DIR/export/round_<k>/<format>)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from celora.export.folders import export_run  # after --help: loading a run imports torch and transformers

    try:
        written = export_run(args.run_dir, args.round, args.models, args.format, args.out,
                             command=["python", "-m", "celora.export", *(argv if argv is not None else sys.argv[1:])])
    except UserError as e:
        print(f"celora.export: {e}", file=sys.stderr)
        return 2
    for folder in written:
        print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
