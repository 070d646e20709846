"""kvpress side by side: the same model, documents, needles and budgets as ``bench/policies.py``.

    python bench/kvpress_side.py --model smollm2-135m --length 4096 --budgets 0.1 0.25 0.5

Builds the token ids here (kvevict's tokenizer, data and seeds), creates kvpress's own environment
on first use (``.kvpress-env``: torch 2.13.0 + kvpress 0.5.5, which pins transformers < 5.3), runs
``bench/kvpress_runner.py`` there on kvevict's fp32 copy of the model, and merges the rows into
``bench/results/policies_<model>_<length>.json`` as ``kvpress:<Press>`` (the markdown table is rewritten
by the next run of ``bench/policies.py``). ``bench/ruler.py --presses ...`` uses :func:`run_presses`
for the long-context tasks.
Protocol difference, forced by kvpress: its presses compress the context in ONE prefill pass (they
do nothing to chunked prefills); the question / continuation follows uncompressed, as here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import PreTrainedModel

from kvevict.evaluate import (Prompt, load_policy_table, policy_row, policy_workload, save_policy_rows,
                              score_answer, table_settings, workload_arguments)
from kvevict.models import MODELS, default_cache_dir, load_model

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


def run_presses(model_name: str, model: PreTrainedModel, presses: list[str], budgets: list[float],
                documents: list[torch.Tensor], prefix: int, prompts: list[Prompt], max_new_tokens: int,
                threads: int) -> list[dict]:
    """Run each press x budget in kvpress's environment. Returns one dict per press and budget:
    ``press``, ``budget``, ``fidelity`` (per document: nll_full, nll, top1_agreement, kl, prefill_s, kv_bytes) and
    ``answers`` (per prompt: text, prefill_s, kv_bytes, decode_ms, seconds, peak_rss_mb); or, for a press that
    failed on this model, ``press``, ``budget`` and ``error``."""
    eos = model.generation_config.eos_token_id
    job = {
        "presses": presses, "budgets": budgets, "threads": threads, "max_new_tokens": max_new_tokens,
        "model_dir": str(default_cache_dir() / "models" / model_name / "fast"),
        "eos_token_ids": [] if eos is None else [eos] if isinstance(eos, int) else list(eos),
        "fidelity": [{"ids": doc[0].tolist(), "prefix": prefix} for doc in documents],
        "prompts": [dict(context=p.context[0].tolist(), question=p.question[0].tolist()) for p in prompts],
    }
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "rows.json"
        job_path.write_text(json.dumps(job))
        subprocess.run([str(ensure_env()), str(ROOT / "bench" / "kvpress_runner.py"), str(job_path), str(out_path)],
                       check=True)
        return json.loads(out_path.read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_arguments(p)
    p.add_argument("--presses", nargs="+", default=PRESSES)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    if args.model not in MODELS:  # kvpress's environment reads kvevict's fp32 copy of a registered model
        p.error(f"kvpress_side runs on the registered models ({', '.join(MODELS)}), got {args.model!r}")
    results = args.out / f"policies_{args.model}_{args.length}.json"
    settings = table_settings(args)
    try:
        rows = load_policy_table(results, settings)
    except ValueError as e:
        p.error(str(e))
    model, tok = load_model(args.model)  # also makes sure the fp32 copy exists
    work = policy_workload(tok, args.length, args.continuation, args.documents, args.depths)
    runs = run_presses(args.model, model, args.presses, args.budgets, work.documents, work.prefix, work.needles, 16,
                       args.threads)
    for run in runs:
        if "error" in run:
            print(f"kvpress:{run['press']} at {run['budget']:.0%} failed: {run['error']}", file=sys.stderr)
    new = [
        {**policy_row(args.model, args.length, f"kvpress:{run['press']}", run["budget"], run["fidelity"],
                      [score_answer(a["text"], p.answers) for a, p in zip(run["answers"], work.needles)]), **settings}
        for run in runs if "error" not in run
    ]
    save_policy_rows(results, rows, new)
    print(json.dumps(new, indent=1))


if __name__ == "__main__":
    main()
