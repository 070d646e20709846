"""Tiny randomly initialised models (built from configs, float64 so comparisons are exact)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

torch.set_num_threads(2)


def tiny_llama(layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, eos_token_id=None, bos_token_id=1,
    )
    return LlamaForCausalLM(cfg).to(torch.float64).eval()


def tiny_gemma3() -> Gemma3ForCausalLM:
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=12, max_position_embeddings=1024,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], pad_token_id=0,
        eos_token_id=None, bos_token_id=1,
    )
    return Gemma3ForCausalLM(cfg).to(torch.float64).eval()


@pytest.fixture(scope="session")
def llama() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="session")
def gemma() -> Gemma3ForCausalLM:
    return tiny_gemma3()


def prompt(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 96, (batch, n), generator=g)


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids ``[n_i]`` as one left-padded batch: ids and attention mask ``[B, longest]``."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask


@pytest.fixture(scope="session")
def bench_script() -> Callable[..., ModuleType]:
    """Import ``<folder>/<name>.py`` by path (``bench`` or ``calibration``: the scripts are not a package)."""

    def load(name: str, folder: str = "bench") -> ModuleType:
        path = Path(__file__).resolve().parent.parent / folder / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{folder}_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
