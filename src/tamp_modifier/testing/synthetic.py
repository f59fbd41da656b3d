"""Tiny, randomly initialised vision-language models and calibration data.

Everything here is built from configs, so it works with no network access and
no model hub.  The models are real ``transformers`` classes (LLaVA, LLaVA-NeXT,
Qwen2-VL, Qwen2.5-VL) so that llm-compressor's ``oneshot`` traces and
calibrates them exactly as it would the full-size checkpoints.

Typical offline use with llm-compressor::

    model = build_tiny_model("qwen2_vl")
    tokenizer = save_tiny_model(model, tmp_dir)  # config on disk: no hub lookup
    ds = make_calibration_dataset(model, 4)
    oneshot(model=model, processor=tokenizer, dataset=ds,
            data_collator=collate_rows,
            recipe=WandaPruningModifier(sparsity=0.5, targets=["Linear"],
                                        ignore=TOWER_IGNORE),
            num_calibration_samples=4, shuffle_calibration_samples=False,
            sequential_targets=[decoder_layer_class(model)],
            max_seq_length=4096)

``processor=`` is mandatory: with ``processor=None`` oneshot tries
``AutoProcessor.from_pretrained(name_or_path)``, which needs an image
processor that these tiny models do not have.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import (
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

from tamp_modifier.text_decoder import TOWER_IGNORE, text_decoder_layer_class

__all__ = [
    "FAMILIES",
    "TOWER_IGNORE",
    "PAD_TOKEN_ID",
    "build_tiny_model",
    "build_random_vlm",
    "build_llava_7b_shaped",
    "build_tiny_tokenizer",
    "build_tiny_processor",
    "word_level_tokenizer",
    "save_tiny_model",
    "make_calibration_dataset",
    "decoder_layer_class",
    "family_of",
    "image_token_id",
    "language_model_num_params",
]

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "smolvlm", "idefics3", "gemma3", "qwen3_vl",
            "internvl", "mistral3", "llava_onevision", "qwen2_audio", "qwen2_5_omni")
# Families with an audio tower: Qwen2-Audio (audio + text) and Qwen2.5-Omni's thinker
# (audio + image + video + text).
AUDIO_FAMILIES = ("qwen2_audio", "qwen2_5_omni")

PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
# Text ids are drawn from [_FIRST_TEXT_ID, first special id) so they never
# collide with padding, bos/eos or any placeholder.
_FIRST_TEXT_ID = 3
# Number of ids reserved at the top of the vocabulary for placeholders.
_NUM_RESERVED_TOP = 4

# Qwen images: one frame of 16x16 patches -> 8x8 merged = 64 image tokens.
_QWEN_GRID_HW = 16

_ARCH_TO_FAMILY = {
    "LlavaForConditionalGeneration": "llava",
    "LlavaNextForConditionalGeneration": "llava_next",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
    "SmolVLMForConditionalGeneration": "smolvlm",
    "Idefics3ForConditionalGeneration": "idefics3",
    "Gemma3ForConditionalGeneration": "gemma3",
    "Qwen3VLForConditionalGeneration": "qwen3_vl",
    "InternVLForConditionalGeneration": "internvl",
    "Mistral3ForConditionalGeneration": "mistral3",
    "LlavaOnevisionForConditionalGeneration": "llava_onevision",
    "Qwen2AudioForConditionalGeneration": "qwen2_audio",
    "Qwen2_5OmniThinkerForConditionalGeneration": "qwen2_5_omni",
}


def family_of(model: PreTrainedModel) -> str:
    """Return the family name (one of ``FAMILIES``) of a supported model."""
    name = type(model).__name__
    if name not in _ARCH_TO_FAMILY:
        raise ValueError(f"unsupported model class {name}; expected one of {list(_ARCH_TO_FAMILY)}")
    return _ARCH_TO_FAMILY[name]


def image_token_id(model: PreTrainedModel) -> int:
    """Return the id of the image placeholder token of ``model``."""
    return int(model.config.image_token_id)


def _special_ids(vocab_size: int) -> dict[str, int]:
    return {
        "image": vocab_size - 1,
        "video": vocab_size - 2,
        "vision_start": vocab_size - 3,
        "vision_end": vocab_size - 4,
    }


def _audio_ids(vocab_size: int) -> dict[str, int]:
    """Audio placeholder and its start/end markers, below the image/video ids (audio families only,
    so the text ids drawn for every other family stay as they were)."""
    return {"audio": vocab_size - 5, "audio_start": vocab_size - 6, "audio_end": vocab_size - 7}


def _mrope_section(head_dim: int) -> list[int]:
    # Same t/h/w split ratio as the real checkpoints ([16, 24, 24] for 128).
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _text_kwargs(hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, vocab_size):
    if not 0 < num_kv_heads < num_heads or num_heads % num_kv_heads:
        raise ValueError("need grouped-query attention: 0 < num_kv_heads < num_heads, dividing it")
    if hidden_size % num_heads:
        raise ValueError("hidden_size must be divisible by num_heads")
    return dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
    )


def _clip_config(vision_hidden_size, vision_layers, image_size, patch_size):
    return CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden_size // 16),
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden_size,
    )


def _build_config(
    family,
    *,
    hidden_size,
    intermediate_size,
    num_layers,
    num_heads,
    num_kv_heads,
    vocab_size,
    vision_hidden_size,
    vision_layers,
    image_size=None,
    patch_size=4,
):
    text = _text_kwargs(hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, vocab_size)
    ids = _special_ids(vocab_size)
    if family == "llava":
        return LlavaConfig(
            text_config=LlamaConfig(**text),
            vision_config=_clip_config(vision_hidden_size, vision_layers, image_size or 32, patch_size),
            image_token_index=ids["image"],
            # -1: use the last tower layer (with one layer, -2 would skip it).
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            image_seq_length=((image_size or 32) // patch_size) ** 2,
            tie_word_embeddings=False,
        )
    if family == "llava_next":
        s = image_size or 24
        return LlavaNextConfig(
            text_config=LlamaConfig(**text),
            vision_config=_clip_config(vision_hidden_size, vision_layers, s, patch_size),
            image_token_index=ids["image"],
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
            image_seq_length=(s // patch_size) ** 2,
            tie_word_embeddings=False,
        )
    if family in ("smolvlm", "idefics3"):
        # A SigLIP tower (model.vision_model), a pixel-shuffle connector
        # (model.connector) and a Llama text model (model.text_model): none of the
        # names the LLaVA/Qwen ignore patterns know.
        config_class = SmolVLMConfig if family == "smolvlm" else Idefics3Config
        return config_class(
            text_config=text,
            vision_config=dict(hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
                               num_hidden_layers=vision_layers,
                               num_attention_heads=max(1, vision_hidden_size // 16),
                               image_size=image_size or 32, patch_size=patch_size),
            image_token_id=ids["image"], scale_factor=2, tie_word_embeddings=False,
        )
    head_dim = hidden_size // num_heads
    if family in AUDIO_FAMILIES:
        return _audio_family_config(family, text, ids, head_dim, vision_hidden_size, vision_layers,
                                    patch_size)
    if family in _MORE_FAMILIES:
        return _more_family_config(family, text, ids, head_dim, vision_hidden_size, vision_layers,
                                   image_size or 32, patch_size)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(head_dim)}
    common = dict(
        text_config=dict(text, rope_parameters=rope),
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=False,
    )
    if family == "qwen2_vl":
        vision = dict(
            depth=vision_layers,
            embed_dim=vision_hidden_size,
            hidden_size=hidden_size,  # merger output = text width
            mlp_ratio=2,
            num_heads=max(1, vision_hidden_size // 16),
            patch_size=patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        return Qwen2VLConfig(vision_config=vision, **common)
    if family == "qwen2_5_vl":
        vision = dict(
            depth=vision_layers,
            hidden_size=vision_hidden_size,
            intermediate_size=2 * vision_hidden_size,
            out_hidden_size=hidden_size,
            num_heads=max(1, vision_hidden_size // 16),
            patch_size=patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
            # 2x2 merged units per window, so windowed attention is exercised.
            window_size=patch_size * 2 * 2,
            fullatt_block_indexes=[vision_layers - 1],
        )
        return Qwen2_5_VLConfig(vision_config=vision, **common)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


# Families built with transformers' own config classes (CONFIG_MAPPING) and loaded
# through AutoModelForImageTextToText: each tower, projector and text model under
# the family's own names.
_MORE_FAMILIES = ("gemma3", "qwen3_vl", "internvl", "mistral3", "llava_onevision")


def _more_family_config(family, text, ids, head_dim, vision_hidden_size, vision_layers, image_size,
                        patch_size):
    from transformers import CONFIG_MAPPING

    text = dict(text, head_dim=head_dim)
    heads = max(1, vision_hidden_size // 16)
    vision = dict(hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
                  num_hidden_layers=vision_layers, num_attention_heads=heads)
    common = dict(tie_word_embeddings=False)
    if family == "gemma3":  # SigLIP tower; 16 tokens per image after its pooling
        return CONFIG_MAPPING["gemma3"](
            text_config=dict(text, sliding_window=8), vision_config=dict(vision, image_size=image_size,
                                                                          patch_size=patch_size),
            mm_tokens_per_image=16, image_token_index=ids["image"], boi_token_index=ids["vision_start"],
            eoi_token_index=ids["vision_end"], **common)
    if family == "qwen3_vl":  # like Qwen2.5-VL, with DeepStack features into the first text layer
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(head_dim),
                "mrope_interleaved": True}
        return CONFIG_MAPPING["qwen3_vl"](
            text_config=dict(text, rope_parameters=rope),
            vision_config=dict(depth=vision_layers, hidden_size=vision_hidden_size,
                               intermediate_size=2 * vision_hidden_size, num_heads=heads,
                               out_hidden_size=text["hidden_size"], patch_size=patch_size,
                               spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                               deepstack_visual_indexes=[0]),
            image_token_id=ids["image"], video_token_id=ids["video"],
            vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"], **common)
    if family == "internvl":  # InternViT tower, pixel-shuffle projector, Qwen2 text model
        return CONFIG_MAPPING["internvl"](
            text_config=dict(text, model_type="qwen2"),
            vision_config=dict(vision, image_size=[image_size, image_size],
                               patch_size=[patch_size, patch_size]),
            image_token_id=ids["image"], downsample_ratio=0.5, vision_feature_layer=-1, **common)
    if family == "mistral3":  # Pixtral tower, patch merger, Mistral text model
        return CONFIG_MAPPING["mistral3"](
            text_config=dict(text, model_type="mistral"),
            vision_config=dict(vision, model_type="pixtral", image_size=image_size, patch_size=patch_size,
                               head_dim=vision_hidden_size // heads),
            image_token_index=ids["image"], spatial_merge_size=2, vision_feature_layer=-1, **common)
    # llava_onevision: SigLIP tower, anyres tiles, Qwen2 text model
    return CONFIG_MAPPING["llava_onevision"](
        text_config=dict(text, model_type="qwen2"),
        vision_config=dict(vision, model_type="siglip_vision_model", image_size=image_size,
                           patch_size=patch_size),
        image_token_index=ids["image"], video_token_index=ids["video"],
        image_grid_pinpoints=[[image_size, image_size]], vision_feature_layer=-1, **common)


# Mel frames per clip: Qwen2-Audio's encoder takes exactly 2 x max_source_positions.
_AUDIO_FRAMES = 64


def _audio_family_config(family, text, ids, head_dim, vision_hidden_size, vision_layers, patch_size):
    from transformers import CONFIG_MAPPING

    audio_ids = _audio_ids(text["vocab_size"])
    audio = dict(d_model=vision_hidden_size, encoder_attention_heads=max(1, vision_hidden_size // 16),
                 encoder_ffn_dim=2 * vision_hidden_size, encoder_layers=vision_layers, num_mel_bins=16,
                 max_source_positions=_AUDIO_FRAMES // 2)
    if family == "qwen2_audio":  # Whisper-style audio tower, a linear projector, a Qwen2 text model
        return CONFIG_MAPPING["qwen2_audio"](
            text_config=dict(text, model_type="qwen2"), audio_config=audio,
            audio_token_index=audio_ids["audio"], tie_word_embeddings=False)
    # qwen2_5_omni: the thinker alone (the talker and its vocoder only speak what it wrote), with
    # an audio tower that attends within windows of 2 x n_window frames and a Qwen2.5-VL tower.
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(head_dim)}
    return CONFIG_MAPPING["qwen2_5_omni_thinker"](
        text_config=dict(text, rope_parameters=rope),
        audio_config=dict(audio, n_window=8, output_dim=text["hidden_size"]),
        vision_config=dict(depth=vision_layers, hidden_size=vision_hidden_size,
                           intermediate_size=2 * vision_hidden_size, out_hidden_size=text["hidden_size"],
                           num_heads=max(1, vision_hidden_size // 16), patch_size=patch_size,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=patch_size * 2 * 2,
                           fullatt_block_indexes=[vision_layers - 1]),
        audio_token_index=audio_ids["audio"], audio_start_token_id=audio_ids["audio_start"],
        audio_end_token_id=audio_ids["audio_end"], image_token_index=ids["image"],
        video_token_index=ids["video"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"], tie_word_embeddings=False)


_MODEL_CLASSES = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "smolvlm": SmolVLMForConditionalGeneration,
    "idefics3": Idefics3ForConditionalGeneration,
}


def _instantiate(family, config, *, seed, dtype, attn_implementation):
    from transformers import AutoModelForImageTextToText

    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    if family == "qwen2_audio":  # transformers maps it to AutoModelForMultimodalLM only
        from transformers import Qwen2AudioForConditionalGeneration

        model = Qwen2AudioForConditionalGeneration(config)
    elif family in _MORE_FAMILIES or family == "qwen2_5_omni":
        model = AutoModelForImageTextToText.from_config(config)
    else:
        model = _MODEL_CLASSES[family](config)
    # The constructor does not always propagate the choice to sub-configs.
    model.set_attn_implementation(attn_implementation)
    model.to(dtype)
    model.eval()
    return model


def build_tiny_model(
    family: str,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 256,
    vision_hidden_size: int = 32,
    vision_layers: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
) -> PreTrainedModel:
    """Build a tiny random VLM of ``family`` (see ``FAMILIES``), in eval mode.

    The text model uses grouped-query attention; placeholder ids sit at the top
    of the vocabulary (``vocab_size - 1`` is the image token).  Image token
    counts per sample: llava 64 (32x32 px, patch 4), llava_next 78 (24x24 px
    anyres base + 1 tile + row newlines), qwen2_vl / qwen2_5_vl 64 (16x16
    patches merged 2x2); qwen2_audio 16 audio tokens (64 mel frames), qwen2_5_omni
    16 audio + 64 image tokens.  ``attn_implementation="eager"`` is the default
    because only eager attention returns attention probabilities.

    The model's ``name_or_path`` is empty; call ``save_tiny_model`` before
    ``oneshot`` so llm-compressor can read the config back offline.
    """
    config = _build_config(
        family,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        vocab_size=vocab_size,
        vision_hidden_size=vision_hidden_size,
        vision_layers=vision_layers,
    )
    return _instantiate(family, config, seed=seed, dtype=dtype, attn_implementation=attn_implementation)


def language_model_num_params(model: PreTrainedModel) -> int:
    """Parameters of the text decoder (embeddings, layers, final norm; no lm_head)."""
    return sum(p.numel() for p in model.model.language_model.parameters())


def build_random_vlm(
    target_params: int = 60_000_000,
    seed: int = 0,
    *,
    hidden_size: int = 512,
    intermediate_size: int = 1536,
    num_heads: int = 8,
    num_kv_heads: int = 2,
    vocab_size: int = 32000,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
) -> PreTrainedModel:
    """Build a random LLaVA whose language model has about ``target_params`` parameters.

    The width is fixed (defaults: hidden 512, 8 heads / 2 kv heads, MLP 1536,
    vocab 32000) and the number of decoder layers is solved for
    ``target_params`` (see ``language_model_num_params``).  The CLIP tower
    (224x224 px, patch 16, width 256, 2 layers) yields 196 image tokens, so
    ``make_calibration_dataset(model, n, text_tokens=60)`` gives 256-token
    samples.
    """
    head_dim = hidden_size // num_heads
    attn = hidden_size * head_dim * (2 * num_heads + 2 * num_kv_heads)
    per_layer = attn + 3 * hidden_size * intermediate_size + 2 * hidden_size
    fixed = vocab_size * hidden_size + hidden_size
    num_layers = max(1, round((target_params - fixed) / per_layer))
    text = _text_kwargs(hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, vocab_size)
    config = LlavaConfig(
        text_config=LlamaConfig(**text),
        vision_config=CLIPVisionConfig(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=224,
            patch_size=16,
            projection_dim=256,
        ),
        image_token_index=vocab_size - 1,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=196,
        tie_word_embeddings=False,
    )
    return _instantiate("llava", config, seed=seed, dtype=dtype, attn_implementation=attn_implementation)


def build_llava_7b_shaped(
    num_layers: int = 32,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    seed: int = 0,
) -> PreTrainedModel:
    """A random LLaVA-1.5-7B-shaped model, built straight on ``device`` in ``dtype``.

    Llama-2-7B text model (hidden 4096, MLP 11008, 32 heads, no GQA, vocab
    32064; ``num_layers`` decoder layers, 32 in the real one) under a CLIP
    ViT-L/14-336 tower (width 1024, 24 layers, 576 image tokens) and a linear
    projector: for timing and memory at real shapes, not for quality. The
    weights are made on ``device`` directly (no float32 copy on the host).
    """
    vocab_size = 32064
    # Not _text_kwargs: Llama-2-7B has no grouped-query attention, which that refuses.
    text = dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=num_layers,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=vocab_size,
        max_position_embeddings=4096, pad_token_id=PAD_TOKEN_ID, bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
    )
    config = LlavaConfig(
        text_config=LlamaConfig(**text),
        vision_config=CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=336, patch_size=14, projection_dim=768,
        ),
        image_token_index=_special_ids(vocab_size)["image"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=576,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.set_attn_implementation("eager")
    return model.eval()


def build_tiny_tokenizer(model: PreTrainedModel) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer covering the model's vocabulary.

    ``oneshot`` insists on a processor whenever a dataset is given (it only
    uses it for the ``"padding"`` collator and for saving), so pass this as
    ``processor=``.
    """
    cfg = model.config
    vocab_size = cfg.get_text_config().vocab_size
    names = {PAD_TOKEN_ID: "<pad>", BOS_TOKEN_ID: "<s>", EOS_TOKEN_ID: "</s>"}
    for attr, name in (
        ("image_token_id", "<image>"),
        ("video_token_id", "<video>"),
        ("vision_start_token_id", "<vision_start>"),
        ("vision_end_token_id", "<vision_end>"),
        ("audio_token_id", "<audio>"),
        ("audio_start_token_id", "<audio_start>"),
        ("audio_end_token_id", "<audio_end>"),
    ):
        if getattr(cfg, attr, None) is not None:
            names[getattr(cfg, attr)] = name
    # Unused reserved slots keep distinct names so the vocab stays a bijection.
    return word_level_tokenizer({names.get(i, f"t{i}"): i for i in range(vocab_size)})


# USER/ASSISTANT turns, an image as its placeholder: enough for apply_chat_template
# and for vLLM's chat endpoint, which both need a template in the checkpoint.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }} {% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image> "
    "{% else %}{{ item['text'] }} {% endif %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tiny_processor(model: PreTrainedModel):
    """A real ``LlavaProcessor`` for a tiny LLaVA: image processor, tokenizer, chat template.

    The image processor resizes and crops to the tower's size with CLIP's usual
    normalisation (the PIL backend: torchvision is not needed). Saved with
    ``save_pretrained`` beside the model, the folder is what a hub LLaVA folder
    is: ``AutoProcessor`` loads it and ``examples/calibration.py`` turns images
    into calibration rows with it.
    """
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if family_of(model) != "llava":
        raise ValueError(f"build_tiny_processor builds LLaVA processors; got {family_of(model)}")
    size = model.config.vision_config.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_tiny_tokenizer(model),
        patch_size=model.config.vision_config.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=TINY_CHAT_TEMPLATE,
    )


def word_level_tokenizer(vocab: dict[str, int], unk_token: str = "<pad>", **kwargs) -> PreTrainedTokenizerFast:
    """A whitespace-split, word-level fast tokenizer over ``vocab`` with the
    ``<pad> <s> </s> <image>`` specials; ``unk_token`` (``<pad>`` unless given)
    stands for words outside ``vocab``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=unk_token))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token=unk_token,
        extra_special_tokens={"image_token": "<image>"}, **kwargs,
    )


def save_tiny_model(model: PreTrainedModel, path: str | os.PathLike, *, weights: bool = False):
    """Write ``model``'s config and a tiny tokenizer to ``path`` and point
    ``model.config.name_or_path`` there.  Returns the tokenizer.

    ``oneshot`` re-reads the config from ``model.config.name_or_path``
    (``Oneshot.validate_model``); an empty name sends that to the hub and
    fails offline.  Still pass the returned tokenizer as ``processor=``.
    ``weights=True`` also saves the weights so the folder is a loadable
    checkpoint.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if weights:
        model.save_pretrained(path)
    else:
        model.config.save_pretrained(path)
    tok = build_tiny_tokenizer(model)
    tok.save_pretrained(path)
    model.config._name_or_path = path
    model.name_or_path = path
    return tok


def decoder_layer_class(model: PreTrainedModel) -> str:
    """Class name of the text decoder layer, for ``sequential_targets=[...]``."""
    return text_decoder_layer_class(model)


# ---------------------------------------------------------------- datasets


def _image_inputs(model, family, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], int]:
    """Random pixel inputs for one image and the number of placeholder tokens."""
    vcfg = model.config.vision_config
    if family == "llava":
        s = vcfg.image_size
        pix = rng.standard_normal((1, 3, s, s), dtype=np.float32)
        n = (s // vcfg.patch_size) ** 2
        if model.config.vision_feature_select_strategy == "full":
            n += 1
        return {"pixel_values": pix}, n
    if family in ("smolvlm", "idefics3"):
        s = vcfg.image_size
        pix = rng.standard_normal((1, 1, 3, s, s), dtype=np.float32)  # [batch, images, C, H, W]
        mask = np.ones((1, 1, s, s), dtype=bool)
        # The connector's pixel shuffle merges scale_factor^2 patches into one token.
        n = (s // vcfg.patch_size) ** 2 // model.config.scale_factor**2
        return {"pixel_values": pix, "pixel_attention_mask": mask}, n
    if family in ("gemma3", "internvl", "mistral3"):
        s = vcfg.image_size[0] if isinstance(vcfg.image_size, (list, tuple)) else vcfg.image_size
        pix = {"pixel_values": rng.standard_normal((1, 3, s, s), dtype=np.float32)}
        if family == "mistral3":
            pix["image_sizes"] = np.array([[s, s]], dtype=np.int64)
        return pix, _num_image_tokens(model, pix)
    if family == "llava_onevision":
        s = vcfg.image_size
        pix = {"pixel_values": rng.standard_normal((1, 2, 3, s, s), dtype=np.float32),
               "image_sizes": np.array([[s, s]], dtype=np.int64)}
        return pix, _num_image_tokens(model, pix)
    if family == "llava_next":
        s = vcfg.image_size
        # anyres picks the [s, s] pinpoint for an s x s image: base + one tile.
        pix = rng.standard_normal((1, 2, 3, s, s), dtype=np.float32)
        sizes = np.array([[s, s]], dtype=np.int64)
        # The unpad/newline arithmetic is intricate: the model itself says how many.
        pixel_inputs = {"pixel_values": pix, "image_sizes": sizes}
        return pixel_inputs, _num_image_tokens(model, pixel_inputs)
    t, hw = 1, _QWEN_GRID_HW
    p, tp, m = vcfg.patch_size, vcfg.temporal_patch_size, vcfg.spatial_merge_size
    pix = rng.standard_normal((t * hw * hw, vcfg.in_channels * tp * p * p), dtype=np.float32)
    grid = np.array([[t, hw, hw]], dtype=np.int64)
    return {"pixel_values": pix, "image_grid_thw": grid}, t * hw * hw // (m * m)


def _num_image_tokens(model, pixel_inputs: dict[str, np.ndarray]) -> int:
    """Image features the model makes from these inputs: its placeholder count (asked once per shape)."""
    key = tuple((k, v.shape) for k, v in sorted(pixel_inputs.items()))
    cache = model.__dict__.setdefault("_synthetic_num_image_tokens_by_shape", {})
    if key not in cache:
        inputs = {k: torch.as_tensor(v) for k, v in pixel_inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.no_grad():
            out = model.model.get_image_features(**inputs)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        feats = list(feats) if isinstance(feats, (list, tuple)) else [feats.reshape(-1, feats.shape[-1])]
        cache[key] = int(sum(f.reshape(-1, f.shape[-1]).shape[0] for f in feats))
    return cache[key]


def _video_inputs(model, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], int]:
    """A Qwen video of 4 frames (2 temporal patches) on an 8 x 8 patch grid, and its token count."""
    vcfg = model.config.vision_config
    t, hw = 2, 8
    p, tp, m = vcfg.patch_size, vcfg.temporal_patch_size, vcfg.spatial_merge_size
    pix = rng.standard_normal((t * hw * hw, vcfg.in_channels * tp * p * p), dtype=np.float32)
    return ({"pixel_values_videos": pix, "video_grid_thw": np.array([[t, hw, hw]], dtype=np.int64)},
            t * hw * hw // (m * m))


def _audio_inputs(model, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], int]:
    """One clip of log-mel features (every frame valid) and its placeholder count: the audio
    tower's two stride-2 stages (conv2, then the average pool) give one token per 4 frames."""
    bins = model.config.audio_config.num_mel_bins
    features = rng.standard_normal((1, bins, _AUDIO_FRAMES), dtype=np.float32)
    after_conv = (_AUDIO_FRAMES - 1) // 2 + 1
    return ({"input_features": features, "feature_attention_mask": np.ones((1, _AUDIO_FRAMES), np.int64)},
            (after_conv - 2) // 2 + 1)


def make_calibration_dataset(
    model: PreTrainedModel,
    num_samples: int,
    *,
    text_tokens: int = 24,
    seed: int = 0,
    pad_to: int | None = None,
    padding_side: str = "right",
    video: bool = False,
) -> Dataset:
    """Pre-tokenised multimodal calibration rows for ``model``, one sample per row.

    Columns: ``input_ids`` and ``attention_mask`` of shape ``[1, L]`` (the
    processor's batch dimension is kept, as llm-compressor's VLM examples do),
    ``pixel_values``, plus ``image_sizes`` (llava_next) or ``image_grid_thw``
    and ``mm_token_type_ids`` (qwen2_vl, qwen2_5_vl).  Each sequence is
    ``prefix text, image placeholders, text`` with about ``text_tokens`` random
    text ids (varying by up to +-2, seeded) that never equal 0 (padding) or any
    placeholder.  ``pad_to`` pads every row to that length with id 0 and mask 0
    on ``padding_side``.  ``video`` (Qwen2-VL, Qwen2.5-VL) adds a 4-frame video after the
    image: ``pixel_values_videos``, ``video_grid_thw`` and its placeholders (mm
    token type 2), so a sample holds three modalities: text, image and video.
    Audio families (qwen2_audio, qwen2_5_omni) put a clip first: ``input_features``
    ``[1, mel bins, 64]`` and ``feature_attention_mask``, its placeholders between
    audio start/end markers; qwen2_5_omni adds the image too (and with ``video``, a
    video and ``video_second_per_grid``): four modalities in one sample.

    The format is torch, so ``model(**ds[i])`` works directly.  For ``oneshot``
    pass ``data_collator=tamp_modifier.calibration_data.collate_rows`` (the default collator would add a
    second batch dimension).
    """
    family = family_of(model)
    if padding_side not in ("left", "right"):
        raise ValueError("padding_side must be 'left' or 'right'")
    if video and family not in ("qwen2_vl", "qwen2_5_vl", "qwen2_5_omni"):
        # Qwen3-VL frames each carry their own timestamp text and vision markers: not built here.
        raise ValueError(f"video=True needs qwen2_vl, qwen2_5_vl or qwen2_5_omni, not {family}")
    cfg = model.config
    vocab_size = cfg.get_text_config().vocab_size
    ids = _special_ids(vocab_size)
    reserved = _NUM_RESERVED_TOP
    if family in AUDIO_FAMILIES:
        ids.update(_audio_ids(vocab_size))
        reserved += len(_audio_ids(vocab_size))
    img_id = int(cfg.image_token_id) if family != "qwen2_audio" else None
    hi = min(min(ids.values()), vocab_size - reserved, *([img_id] if img_id is not None else []))
    if hi <= _FIRST_TEXT_ID:
        raise ValueError("vocabulary too small for random text ids")
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    for _ in range(num_samples):
        inputs, pieces, text = {}, [], None
        if family in AUDIO_FAMILIES:  # the clip first, as Qwen's chat templates place it
            audio, n_audio = _audio_inputs(model, rng)
            inputs.update(audio)
        if family != "qwen2_audio":
            image, n_img = _image_inputs(model, family, rng)
            inputs.update(image)
        n_text = max(2, text_tokens + int(rng.integers(-2, 3)))
        n_prefix = min(4, n_text // 2)
        text = rng.integers(_FIRST_TEXT_ID, hi, size=n_text)
        pieces = [text[:n_prefix]]
        if family in AUDIO_FAMILIES:
            pieces += [[ids["audio_start"]], np.full(n_audio, ids["audio"]), [ids["audio_end"]]]
            if family == "qwen2_5_omni":
                pieces += [text[n_prefix: n_prefix + 1]]
                n_prefix += 1
        if img_id is not None and family.startswith("qwen"):
            pieces += [[ids["vision_start"]], np.full(n_img, img_id), [ids["vision_end"]]]
        elif img_id is not None:
            pieces += [np.full(n_img, img_id)]
        if video:
            clip, n_vid = _video_inputs(model, rng)
            inputs.update(clip)
            if family == "qwen2_5_omni":  # seconds per temporal patch, for its time positions
                inputs["video_second_per_grid"] = np.ones(1, dtype=np.float32)
            vid_id = int(cfg.video_token_id)
            pieces += [text[n_prefix: n_prefix + 2], [ids["vision_start"]], np.full(n_vid, vid_id),
                       [ids["vision_end"]], text[n_prefix + 2:]]
        else:
            pieces.append(text[n_prefix:])
        input_ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in pieces])
        mask = np.ones_like(input_ids)
        if pad_to is not None:
            extra = pad_to - input_ids.shape[0]
            if extra < 0:
                raise ValueError(f"pad_to={pad_to} is shorter than a sample ({input_ids.shape[0]} tokens)")
            width = (extra, 0) if padding_side == "left" else (0, extra)
            input_ids = np.pad(input_ids, width, constant_values=PAD_TOKEN_ID)
            mask = np.pad(mask, width, constant_values=0)
        row = {"input_ids": input_ids[None], "attention_mask": mask[None], **inputs}
        if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):  # the others' forwards take no token types
            types = (input_ids == img_id).astype(np.int64)
            if video:
                types[input_ids == int(cfg.video_token_id)] = 2
            row["mm_token_type_ids"] = types[None]
        rows.append(row)
    ds = Dataset.from_list(rows)
    ds.set_format("torch")
    return ds
