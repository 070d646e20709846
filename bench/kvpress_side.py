"""kvpress side by side: the same model, documents, needles and budgets as ``bench/policies.py``.

    python bench/kvpress_side.py --model smollm2-135m --length 4096 --budgets 0.1 0.25 0.5

Builds the token ids here (kvevict's tokenizer, data and seeds), creates kvpress's own environment
on first use (``.kvpress-env``: torch 2.13.0 + kvpress 0.5.5, which pins transformers < 5.3), runs
``bench/kvpress_runner.py`` there on kvevict's fp32 copy of the model, and merges the rows into
``bench/results/policies_<model>_<length>.json`` as ``kvpress:<Press>`` (the markdown table is rewritten
by the next run of ``bench/policies.py``).
Protocol difference, forced by kvpress: its presses compress the context in ONE prefill pass (they
do nothing to chunked prefills); the question and continuation follow uncompressed, as here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from kvevict.evaluate import policy_workload, workload_arguments
from kvevict.models import default_cache_dir, load_model

ROOT = Path(__file__).resolve().parent.parent
ENV = ROOT / ".kvpress-env"
PRESSES = ["StreamingLLMPress", "SnapKVPress", "TOVAPress", "KnormPress", "ExpectedAttentionPress",
           "AdaKV:ExpectedAttentionPress"]


def ensure_env() -> Path:
    python = ENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(ENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "kvpress==0.5.5"], check=True)
    return python


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_arguments(p)
    p.add_argument("--presses", nargs="+", default=PRESSES)
    args = p.parse_args(argv)
    _, tok = load_model(args.model)  # makes sure the fp32 copy exists
    work = policy_workload(tok, args.length, args.continuation, args.documents, args.depths)
    job = {
        "model": args.model, "length": args.length, "presses": args.presses, "budgets": args.budgets,
        "model_dir": str(default_cache_dir() / "models" / args.model / "fast"), "threads": args.threads,
        "max_new_tokens": 16,
        "fidelity": [{"ids": doc[0].tolist(), "prefix": work.prefix} for doc in work.documents],
        "needles": [dict(context=pr.context[0].tolist(), question=pr.question[0].tolist(), answers=list(pr.answers))
                    for pr in work.needles],
    }
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "rows.json"
        job_path.write_text(json.dumps(job))
        subprocess.run([str(ensure_env()), str(ROOT / "bench" / "kvpress_runner.py"), str(job_path), str(out_path)],
                       check=True)
        new = json.loads(out_path.read_text())
    results = ROOT / "bench" / "results" / f"policies_{args.model}_{args.length}.json"
    rows = json.loads(results.read_text()) if results.exists() else []
    keys = {(r["policy"], r["budget"]) for r in new}
    rows = [r for r in rows if (r["policy"], r["budget"]) not in keys] + new
    results.write_text(json.dumps(rows, indent=1))
    print(json.dumps(new, indent=1))


if __name__ == "__main__":
    main()
