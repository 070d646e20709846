"""The README demo: answer a question about a long document with the full cache and an evicting one."""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache

from .cache import EvictionCache
from .compat import with_cache
from .data import essay_document
from .evaluate import kv_bytes
from .models import load_model

NEEDLE = "The secret code word of the harbour office is TANGERINE-42."
QUESTION = "What is the secret code word of the harbour office? Answer with the code word only."


def budget_arg(text: str) -> int | float:
    """``512`` is a number of entries, ``0.25`` or ``1.0`` (a point) a fraction of the tokens."""
    return float(text) if any(c in text for c in ".eE") else int(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="kvevict demo", description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=3500, help="document length in tokens")
    p.add_argument("--depth", type=float, default=0.5, help="where the answer sits in the document (0-1)")
    p.add_argument("--policy", default="streaming")
    p.add_argument("--budget", type=budget_arg, default=512,
                   help="entries per (layer, KV head), or a fraction in (0, 1] written with a point (0.25, 1.0)")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk size")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tok = load_model(args.model)
    document = essay_document(tok, args.tokens, NEEDLE, args.depth)
    messages = [{"role": "user", "content": f"{document}\n\n{QUESTION}"}]
    if tok.chat_template:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:
        ids = tok(f"{document}\n\nQuestion: {QUESTION}\nAnswer:", return_tensors="pt")
    n = ids["input_ids"].shape[1]
    print(f"document: {n} tokens, the answer sits at {args.depth:.0%} depth")

    runs = {"full cache": lambda: DynamicCache(config=model.config),
            f"{args.policy}, budget {args.budget}": lambda: EvictionCache(model, args.policy, budget=args.budget)}
    for name, make_cache in runs.items():
        cache = make_cache()  # an EvictionCache switches the model to kvevict attention
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**ids, **with_cache(model, cache), max_new_tokens=24, do_sample=False,
                                 prefill_chunk_size=args.chunk)
        seconds = time.perf_counter() - start
        answer = tok.decode(out[0, n:], skip_special_tokens=True).strip()
        print(f"\n[{name}] {seconds:.1f} s, KV held {kv_bytes(cache) / 2**20:.1f} MB")
        print(f"  answer: {answer!r}")
