"""Runs NVIDIA kvpress presses on token ids prepared by ``bench/kvpress_side.py``.

Executed INSIDE kvpress's own environment (kvpress 0.5.5 pins transformers < 5.3), so it imports
neither the kvevict package (two of its modules that need at most torch, ``rss`` and ``compat``, are
loaded by path) nor anything newer: it reads a JSON job (model directory, presses, ratios, fidelity
documents, prompts) and writes, per press and budget, the raw fidelity numbers of each document and
the answer (text and costs) to each prompt; kvevict's side aggregates and scores them.
kvpress compresses only during the first prefill of an empty cache, so each context is prefilled in
one forward pass under the press; the question / continuation follows without compression.

Hybrid sliding-window models (Gemma 3): kvpress 0.5.5 applies its own Gemma 3 rule (compress only the
full-attention layers) to ``Gemma3ForConditionalGeneration`` alone; on the text model it compresses the
sliding layers too, and transformers < 5.3 sizes every later pass's masks by one layer's stored length
(a multi-token pass then lets the compressed layers see later tokens): the model emits garbage.
Here the rule is applied to the text model as well (:func:`pressed`), the cache knows the layer types,
and every pass after the compression gets one mask per layer type (:func:`layer_masks`).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache


def _kvevict_module(name: str):
    """``kvevict/<name>.py`` loaded by path: kvevict itself is not installed here, and these modules
    import only the standard library and torch."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "kvevict" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rss = _kvevict_module("rss")
compat = _kvevict_module("compat")  # the cache keyword: `cache` from transformers 5.24, else `past_key_values`


def held_bytes(cache) -> int:
    """Bytes the cache's key/value tensors really hold (masked presses keep every entry)."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)


def make_press(name: str, ratio: float):
    import kvpress  # here, not at the top: the tests import this module's helpers without kvpress

    if name.startswith("AdaKV:"):
        return kvpress.AdaKVPress(make_press(name.split(":", 1)[1], ratio))
    if not name.endswith("Press") or not hasattr(kvpress, name):
        raise ValueError(f"kvpress has no press {name!r} (e.g. SnapKVPress, or AdaKV:SnapKVPress)")
    return getattr(kvpress, name)(compression_ratio=ratio)


def decoder(model):
    """The decoder stack (``model.model`` or, in a multimodal model, its language model)."""
    return model.model.language_model if hasattr(model.model, "language_model") else model.model


def hybrid(model) -> bool:
    """Whether the model mixes sliding-window and full-attention layers."""
    return "sliding_attention" in (getattr(decoder(model).config, "layer_types", None) or [])


@contextmanager
def pressed(model, press):
    """``press`` applied to ``model``: kvpress's own context manager, except on hybrid models, where its
    hooks go on the full-attention layers only (kvpress's Gemma 3 rule) and each hooked layer's RoPE is
    the one of its layer type (kvpress calls it without one: Gemma 3's needs it)."""
    if not hybrid(model):
        with press(model):
            yield
        return
    press.post_init_from_model(model)
    lm, hooks = decoder(model), []
    try:
        for layer in lm.layers:
            if not layer.self_attn.is_sliding:
                layer.self_attn.rotary_emb = partial(lm.rotary_emb, layer_type=layer.attention_type)
                hooks.append(layer.self_attn.register_forward_hook(press.forward_hook, with_kwargs=True))
        yield
    finally:
        for hook in hooks:
            hook.remove()


def layer_masks(model, cache: DynamicCache, q: int) -> dict | None:
    """Attention masks ``[1, 1, q, keys]`` per layer type for ``q`` new tokens after a compressed
    prefill of a hybrid model (None otherwise: one mask, built by transformers, is right). The
    full-attention layers see all their kept entries and the new tokens causally; the sliding layers
    see the keys less than a window behind each query."""
    if not hybrid(model):
        return None
    full = cache.layers[cache.is_sliding.index(False)]
    kept = full.keys.shape[-2]
    causal = torch.ones(q, q, dtype=torch.bool).tril()
    sliding = cache.layers[cache.is_sliding.index(True)]
    seen, stored = sliding.cumulative_length, sliding.keys.shape[-2]
    keys, queries = torch.arange(seen - stored, seen + q), torch.arange(seen, seen + q)[:, None]
    return {"full_attention": torch.cat([torch.ones(q, kept, dtype=torch.bool), causal], 1)[None, None],
            "sliding_attention": ((keys <= queries) & (keys > queries - sliding.sliding_window))[None, None]}


@torch.inference_mode()
def compressed(model, ids: torch.Tensor, press) -> tuple[DynamicCache, float, int]:
    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    if press is None:
        model(ids, **compat.with_cache(model, cache), logits_to_keep=1)
    else:
        with pressed(model, press):
            model(ids, **compat.with_cache(model, cache), logits_to_keep=1)
    return cache, time.perf_counter() - start, held_bytes(cache)


def extend(model, cache: DynamicCache, ids: torch.Tensor, seen: int, **kwargs):
    """Forward ``ids`` [1, q] after ``seen`` tokens into the (compressed) ``cache``."""
    return model(ids, **compat.with_cache(model, cache), position_ids=positions(seen, ids.shape[1]),
                 attention_mask=layer_masks(model, cache, ids.shape[1]), **kwargs)


def positions(start: int, n: int) -> torch.Tensor:
    """Explicit RoPE positions: a compressed DynamicCache's length is no longer the tokens seen
    (kvpress's own pipeline passes them the same way)."""
    return torch.arange(start, start + n)[None]


@torch.inference_mode()
def greedy(model, cache, ids: torch.Tensor, seen: int, new_tokens: int, eos: set[int]) -> tuple[list[int], float]:
    """Greedy answer after the question ``ids``; returns the tokens (up to an end token, excluded) and
    ms per forward pass, question prefill included (as kvevict's ``answer``, whose count of generated
    tokens includes the end token: one per forward pass)."""
    start = time.perf_counter()
    out = []
    logits = extend(model, cache, ids, seen, logits_to_keep=1).logits
    passes = 1
    seen += ids.shape[1]
    for step in range(new_tokens):
        token = logits[:, -1:].argmax(-1)
        if int(token) in eos:
            break
        out.append(int(token))
        if step + 1 < new_tokens:
            logits = extend(model, cache, token, seen).logits
            passes += 1
            seen += 1
    return out, 1000 * (time.perf_counter() - start) / passes


@torch.inference_mode()
def fidelity(model, ids: torch.Tensor, prefix: int, ref: torch.Tensor, press) -> dict:
    cache, seconds, held = compressed(model, ids[:, :prefix], press)
    logits = extend(model, cache, ids[:, prefix:], prefix).logits
    lp = logits[0].float().log_softmax(-1)
    target = ids[0, prefix + 1 :]
    return {
        "nll_full": -ref[:-1].gather(-1, target[:, None]).mean().item(),
        "nll": -lp[:-1].gather(-1, target[:, None]).mean().item(),
        "top1_agreement": (ref[:-1].argmax(-1) == lp[:-1].argmax(-1)).float().mean().item(),
        "kl": (ref[:-1].exp() * (ref[:-1] - lp[:-1])).sum(-1).mean().item(),
        "prefill_s": seconds, "kv_bytes": held,
    }


def answer(model, tok, prompt: dict, press, max_new_tokens: int, eos: set[int]) -> dict:
    """Compress the context with ``press``, answer the question greedily; the text and its costs."""
    context = torch.tensor([prompt["context"]])
    rss.reset_peak_rss()
    start = time.perf_counter()
    cache, seconds, held = compressed(model, context, press)
    tokens, decode_ms = greedy(model, cache, torch.tensor([prompt["question"]]), context.shape[1], max_new_tokens, eos)
    return {"text": tok.decode(tokens, skip_special_tokens=True), "prefill_s": seconds, "kv_bytes": held,
            "decode_ms": decode_ms, "seconds": time.perf_counter() - start, "peak_rss_mb": rss.peak_rss_mb()}


def main(job_path: str, out_path: str) -> None:
    job = json.loads(open(job_path).read())
    torch.set_num_threads(job["threads"])
    for name in job["presses"]:  # a misspelt press fails now, not after the reference passes
        make_press(name, 0.5)
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    eos = set(job["eos_token_ids"])
    docs = [(torch.tensor([d["ids"]]), d["prefix"]) for d in job["fidelity"]]
    refs = []
    for ids, prefix in docs:
        cache, _, _ = compressed(model, ids[:, :prefix], None)
        with torch.inference_mode():
            logits = extend(model, cache, ids[:, prefix:], prefix).logits
            refs.append(logits[0].float().log_softmax(-1))
    rows = []
    for name in job["presses"]:
        for budget in job["budgets"]:
            press = make_press(name, 1.0 - budget)
            try:
                fid = [fidelity(model, ids, prefix, ref, press) for (ids, prefix), ref in zip(docs, refs)]
                answers = [answer(model, tok, prompt, press, job["max_new_tokens"], eos) for prompt in job["prompts"]]
            except Exception as e:  # a press that fails on this model is reported, not fatal to the others
                rows.append({"press": name, "budget": budget, "error": f"{type(e).__name__}: {e}"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            rows.append({"press": name, "budget": budget, "fidelity": fid, "answers": answers})
            print(json.dumps({"press": name, "budget": budget}), flush=True)
    open(out_path, "w").write(json.dumps(rows))


if __name__ == "__main__":
    main(*sys.argv[1:3])
