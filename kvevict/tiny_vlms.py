"""Tiny randomly initialised vision-language models, built from configs, with hand-made inputs.

Every factory returns ``(model, make_inputs)``. ``make_inputs(n_images, text_len, batch=1, images=None,
seed=0)`` builds what the family's processor would: ``input_ids`` with each image expanded to its
placeholder tokens (and the family's wrapper tokens), ``pixel_values`` in the family's layout, an
``attention_mask`` and whatever else ``generate`` needs (``image_grid_thw`` + ``mm_token_type_ids`` for
Qwen2-VL / Qwen2.5-VL, ``token_type_ids`` for Gemma3, ``pixel_attention_mask`` for Idefics3 / SmolVLM).

Layout of every row: ``PREFIX`` text tokens (BOS first), then the images one after the other, then
``text_len`` text tokens. ``images`` (``[batch, n_images, 3, SIZE, SIZE]`` or ``[n_images, 3, SIZE, SIZE]``,
shared by the rows) replaces the random pixels, e.g. to plant identical images.

Every family expands an image to ``TOKENS_PER_IMAGE`` image tokens. Token ids: text ``2 .. TEXT_MAX - 1``,
special tokens (image placeholder, wrappers) above, all inside the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

VOCAB = 300
TEXT_MAX = 280  # text tokens are drawn from 2 .. TEXT_MAX - 1
PAD, BOS = 0, 1
IMAGE = 290  # the image placeholder token of every family
BOI, EOI = 291, 292  # Gemma3 begin / end of image
VISION_START, VISION_END, VIDEO = 293, 294, 295  # Qwen2-VL / Qwen2.5-VL
FAKE_AROUND, GLOBAL_IMG = 296, 297  # Idefics3 / SmolVLM "<fake_token_around_image>", "<global-img>"
PREFIX = 3  # text tokens before the first image (BOS included)

SIZE = 32  # image side in pixels
PATCH = 4  # vision patch side (all but Llava's CLIP): 8 x 8 patches per image
TOKENS_PER_IMAGE = 16  # CLIP: 4 x 4 patches of 8 px; the others: 8 x 8 patches of 4 px, merged / pooled 2 x 2

HIDDEN = 64
TEXT_LAYERS = 2

MakeInputs = Callable[..., dict]


def _llama_text(**extra) -> dict:
    return dict(
        model_type="llama", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD,
        bos_token_id=BOS, eos_token_id=None, **extra,
    )


def _finish(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    model = model.to(dtype).eval()
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = None, PAD, BOS
    return model


# --------------------------------------------------------------------------- shared input helpers


@dataclass(frozen=True)
class Layout:
    """How one family writes an image into the token sequence."""

    before: tuple[int, ...] = ()  # wrapper tokens before the placeholders
    after: tuple[int, ...] = ()  # and after

    def image_block(self) -> list[int]:
        return [*self.before, *[IMAGE] * TOKENS_PER_IMAGE, *self.after]


def _pixels(n_images: int, batch: int, images: torch.Tensor | None, g: torch.Generator,
            dtype: torch.dtype) -> torch.Tensor:
    """``[batch, n_images, 3, SIZE, SIZE]`` raw images."""
    if images is None:
        return torch.randn(batch, n_images, 3, SIZE, SIZE, generator=g).to(dtype)
    images = images.to(dtype)
    if images.dim() == 4:
        images = images.expand(batch, *images.shape)
    if tuple(images.shape) != (batch, n_images, 3, SIZE, SIZE):
        raise ValueError(f"images must be [batch, n_images, 3, {SIZE}, {SIZE}], got {tuple(images.shape)}")
    return images


def _ids(layout: Layout, n_images: int, text_len: int, batch: int, g: torch.Generator) -> torch.Tensor:
    rows = []
    for _ in range(batch):
        head = [BOS, *torch.randint(2, TEXT_MAX, (PREFIX - 1,), generator=g).tolist()]
        tail = torch.randint(2, TEXT_MAX, (text_len,), generator=g).tolist()
        rows.append(head + layout.image_block() * n_images + tail)
    return torch.tensor(rows, dtype=torch.long)


def _base(layout: Layout, n_images: int, text_len: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = _ids(layout, n_images, text_len, batch, g)
    return g, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# --------------------------------------------------------------------------- Llava (CLIP + Llama)


def tiny_llava(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, MakeInputs]:
    """CLIP vision tower (4 x 4 patches of 8 px; the CLS token is dropped) and a Llama decoder."""
    torch.manual_seed(0)
    patch = SIZE // int(TOKENS_PER_IMAGE ** 0.5)  # 8 px: 4 x 4 = 16 patches = 16 tokens
    cfg = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, image_size=SIZE, patch_size=patch, projection_dim=32,
        ),
        text_config=_llama_text(),
        image_token_index=IMAGE, image_seq_length=TOKENS_PER_IMAGE, vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    model = _finish(LlavaForConditionalGeneration(cfg), dtype)
    layout = Layout()

    def make_inputs(n_images: int, text_len: int, batch: int = 1, images: torch.Tensor | None = None,
                    seed: int = 0) -> dict:
        g, out = _base(layout, n_images, text_len, batch, seed)
        if n_images:
            out["pixel_values"] = _pixels(n_images, batch, images, g, dtype).flatten(0, 1)
        return out

    return model, make_inputs


# --------------------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL

TEMPORAL = 2
MERGE = 2


def _qwen_patches(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Qwen2-VL image processor's flattening: ``[B, N, 3, S, S]`` -> patches
    ``[B * N * gh * gw, 3 * TEMPORAL * PATCH * PATCH]`` and ``image_grid_thw`` ``[B * N, 3]``."""
    b, n, c, s, _ = pixels.shape
    frames = pixels.flatten(0, 1)[:, None].expand(-1, TEMPORAL, -1, -1, -1)  # a still image: frame repeated
    g = s // PATCH
    x = frames.reshape(b * n, 1, TEMPORAL, c, g // MERGE, MERGE, PATCH, g // MERGE, MERGE, PATCH)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    patches = x.reshape(b * n * g * g, c * TEMPORAL * PATCH * PATCH)
    grid = torch.tensor([[1, g, g]] * (b * n), dtype=torch.long)
    return patches, grid


def _qwen_inputs(dtype: torch.dtype) -> MakeInputs:
    layout = Layout(before=(VISION_START,), after=(VISION_END,))

    def make_inputs(n_images: int, text_len: int, batch: int = 1, images: torch.Tensor | None = None,
                    seed: int = 0) -> dict:
        g, out = _base(layout, n_images, text_len, batch, seed)
        out["mm_token_type_ids"] = (out["input_ids"] == IMAGE).long()
        if n_images:
            out["pixel_values"], out["image_grid_thw"] = _qwen_patches(_pixels(n_images, batch, images, g, dtype))
        return out

    return make_inputs


def _qwen_text(**extra) -> dict:
    # head_dim 16 -> 8 rotary frequencies, split 2 / 3 / 3 over (temporal, height, width)
    return dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=BOS, eos_token_id=None, pad_token_id=PAD, **extra,
    )


def tiny_qwen2_vl(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, MakeInputs]:
    """Qwen2-VL: 8 x 8 patches of 4 px (2 frames), merged 2 x 2 -> 16 tokens between vision start / end."""
    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        vision_config=dict(
            depth=2, embed_dim=32, hidden_size=HIDDEN, mlp_ratio=2, num_heads=2, patch_size=PATCH,
            spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
        ),
        text_config=_qwen_text(),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    return _finish(Qwen2VLForConditionalGeneration(cfg), dtype), _qwen_inputs(dtype)


def tiny_qwen2_5_vl(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, MakeInputs]:
    """Qwen2.5-VL: like Qwen2-VL, with windowed attention (2 x 2 merged tokens) in vision block 0."""
    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=HIDDEN, patch_size=PATCH,
            spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, window_size=2 * MERGE * PATCH,
            fullatt_block_indexes=[1],
        ),
        text_config=_qwen_text(),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    return _finish(Qwen2_5_VLForConditionalGeneration(cfg), dtype), _qwen_inputs(dtype)


# --------------------------------------------------------------------------- Idefics3 / SmolVLM


def _idefics_like(config_cls, model_cls, dtype: torch.dtype) -> tuple[PreTrainedModel, MakeInputs]:
    torch.manual_seed(0)
    cfg = config_cls(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE,
            patch_size=PATCH,
        ),
        text_config=_llama_text(),
        image_token_id=IMAGE, scale_factor=2, pad_token_id=PAD,
    )
    model = _finish(model_cls(cfg), dtype)
    # the processor without image splitting: <fake_token_around_image><global-img><image>*64/4<fake_token_around_image>
    layout = Layout(before=(FAKE_AROUND, GLOBAL_IMG), after=(FAKE_AROUND,))

    def make_inputs(n_images: int, text_len: int, batch: int = 1, images: torch.Tensor | None = None,
                    seed: int = 0) -> dict:
        g, out = _base(layout, n_images, text_len, batch, seed)
        if n_images:
            out["pixel_values"] = _pixels(n_images, batch, images, g, dtype)
            out["pixel_attention_mask"] = torch.ones(batch, n_images, SIZE, SIZE, dtype=torch.bool)
        return out

    return model, make_inputs


def tiny_idefics3(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, MakeInputs]:
    """Idefics3: SigLIP-like tower (8 x 8 patches), pixel shuffle x2 -> 16 tokens, Llama decoder."""
    return _idefics_like(Idefics3Config, Idefics3ForConditionalGeneration, dtype)


def tiny_smolvlm(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, MakeInputs]:
    """SmolVLM: the Idefics3 architecture under its own classes."""
    return _idefics_like(SmolVLMConfig, SmolVLMForConditionalGeneration, dtype)


# --------------------------------------------------------------------------- Gemma3 (SigLIP + Gemma3)


def tiny_gemma3_vlm(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, MakeInputs]:
    """Gemma3: SigLIP tower (8 x 8 patches) avg-pooled to 4 x 4 = 16 tokens between BOI / EOI; a sliding and
    a full-attention decoder layer; image tokens attend bidirectionally within their image at prefill."""
    torch.manual_seed(0)
    cfg = Gemma3Config(
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, image_size=SIZE, patch_size=PATCH, vision_use_head=False,
        ),
        text_config=dict(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=TEXT_LAYERS,
            num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
            sliding_window=16, layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
            pad_token_id=PAD, bos_token_id=BOS, eos_token_id=None,
        ),
        mm_tokens_per_image=TOKENS_PER_IMAGE, boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMAGE,
    )
    model = _finish(Gemma3ForConditionalGeneration(cfg), dtype)
    layout = Layout(before=(BOI,), after=(EOI,))

    def make_inputs(n_images: int, text_len: int, batch: int = 1, images: torch.Tensor | None = None,
                    seed: int = 0) -> dict:
        g, out = _base(layout, n_images, text_len, batch, seed)
        out["token_type_ids"] = (out["input_ids"] == IMAGE).long()
        if n_images:
            out["pixel_values"] = _pixels(n_images, batch, images, g, dtype).flatten(0, 1)
        return out

    return model, make_inputs


FAMILIES: dict[str, Callable[..., tuple[PreTrainedModel, MakeInputs]]] = {
    "llava": tiny_llava,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "idefics3": tiny_idefics3,
    "smolvlm": tiny_smolvlm,
    "gemma3": tiny_gemma3_vlm,
}
