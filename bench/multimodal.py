"""Multimodal memory and speed: a multi-image prompt through a vision-language model, full cache vs
evicting caches at several budgets.

    python bench/multimodal.py --model tiny-llava --images 16 --budgets 0.25 0.5
    python bench/multimodal.py --model /path/to/a/vlm --images 8        # with real weights

``tiny-<family>`` builds a randomly initialised tiny VLM of that family (llava, qwen2_vl, qwen2_5_vl,
idefics3, smolvlm, gemma3; see ``kvevict.tiny_vlms``) and feeds it real images (easy-vqa, fetched
from PyPI) resized to its input size. Random weights give memory and speed figures, never accuracy:
no accuracy figure is possible here without real weights. A model path uses its own processor.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import DynamicCache

from kvevict import EvictionCache, with_cache
from kvevict.data import images as real_images
from kvevict.evaluate import kv_bytes
from kvevict.machine import hardware
from kvevict.tiny_vlms import FAMILIES, SIZE


def tiny_inputs(family: str, n_images: int, text_len: int):
    model, make_inputs = FAMILIES[family]()
    pixels = torch.stack([  # [n, 3, SIZE, SIZE] in [-1, 1]
        torch.from_numpy(np.asarray(img.resize((SIZE, SIZE)), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
        for img in real_images(n_images)
    ])
    return model, make_inputs(n_images, text_len, images=pixels)


def pretrained_inputs(path: str, n_images: int):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    content = [{"type": "image", "image": img} for img in real_images(n_images)]
    content.append({"type": "text", "text": "Describe what these images have in common."})
    inputs = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    return model, inputs


@torch.inference_mode()
def measure(model, inputs: dict, make_cache, new_tokens: int) -> dict:
    """Prefill time (one new token) and decode ms/token (the rest), KV bytes and entries at the end."""
    times = {}
    for n in (1, new_tokens):
        cache = make_cache()
        if isinstance(cache, EvictionCache):
            cache.prepare(inputs)
        start = time.perf_counter()
        model.generate(**inputs, **with_cache(model, cache), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        times[n] = time.perf_counter() - start
    row = {"prefill_s": round(times[1], 4), "decode_ms": round(1000 * (times[new_tokens] - times[1]) / (new_tokens - 1), 2),
           "kv_bytes": kv_bytes(cache)}
    if isinstance(cache, EvictionCache):
        full = [l for l in cache.layers if l.sliding_window is None and l.is_initialized]
        image = [cache.modality.lookup(l.kv.positions) for l in full]
        row["image_entries"] = sum(int(m.sum()) for m in image)
        row["text_entries"] = sum(int((l.kv.valid() & ~m).sum()) for l, m in zip(full, image))
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-llava")
    p.add_argument("--images", type=int, nargs="+", default=[8, 32])
    p.add_argument("--text", type=int, default=64, help="text tokens after the images (tiny models)")
    p.add_argument("--policies", nargs="+", default=["dart", "streaming"])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    p.add_argument("--new-tokens", type=int, default=17)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error(f"--new-tokens must be at least 2 (decode time is measured after the first), got {args.new_tokens}")
    tiny = args.model.startswith("tiny-")
    if tiny and args.model.removeprefix("tiny-") not in FAMILIES:
        p.error(f"unknown tiny VLM {args.model!r}; known: {', '.join('tiny-' + f for f in FAMILIES)}")
    torch.set_num_threads(args.threads)
    rows = []
    for n in args.images:
        if tiny:
            model, inputs = tiny_inputs(args.model.removeprefix("tiny-"), n, args.text)
        else:
            model, inputs = pretrained_inputs(args.model, n)
        configs = [("full", None)] + [(pol, b) for pol in args.policies for b in args.budgets]
        for policy, budget in tqdm(configs, desc=f"{args.model}, {n} images"):
            make = ((lambda: DynamicCache(config=model.config.get_text_config())) if policy == "full"
                    else (lambda: EvictionCache(model, policy, budget=budget)))
            row = {"model": args.model, "images": n, "prompt_tokens": int(inputs["input_ids"].shape[1]),
                   "policy": policy, "budget": budget, **measure(model, inputs, make, args.new_tokens)}
            rows.append(row)
            tqdm.write(json.dumps(row))
    stem = args.out / f"multimodal_{args.model.replace('/', '_')}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    lines = [f"# Multimodal memory and speed: {args.model}", "",
             ("Random weights: memory and speed only, no accuracy. " if tiny else "") + f"{hardware()}.", "",
             "| images | prompt tokens | policy | budget | prefill s | decode ms/token | KV KB | image / text entries |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kept = f"{r['image_entries']} / {r['text_entries']}" if "image_entries" in r else "-"
        budget = "-" if r["budget"] is None else f"{r['budget']:.0%}"
        lines.append(f"| {r['images']} | {r['prompt_tokens']} | {r['policy']} | {budget} | {r['prefill_s']} | "
                     f"{r['decode_ms']} | {r['kv_bytes'] / 1024:.0f} | {kept} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
