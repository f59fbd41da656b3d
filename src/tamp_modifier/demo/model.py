"""The demo model: a small LLaVA (CLIP tower, MLP projector, Llama with GQA),
its word-level tokenizer, and how questions become model inputs.

Sizes: vision 64 x 64 images in 8-pixel patches (64 image tokens, CLS dropped
as in LLaVA), width 128, 3 layers; language model width 128, 6 layers, 4 query
/ 2 key-value heads, MLP 384, a 2,048-word vocabulary (the task words, then the
commonest words of the English corpus it first learns, ``demo.corpus``). About
2.5M parameters, 10 MB in float32. A prompt is ``<s> <image> x 64 question-words``
(text-only: no image tokens), so image tokens outnumber text tokens about 8 to 1,
as in real LLaVA prompts.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from tamp_modifier.demo.corpus import frequent_words
from tamp_modifier.demo.tasks import CELL, IMAGE_SIZE, Question, vocabulary
from tamp_modifier.testing.synthetic import word_level_tokenizer

__all__ = [
    "IMAGE_TOKENS",
    "SPECIAL_TOKENS",
    "VOCAB_SIZE",
    "CHAT_TEMPLATE",
    "build_demo_model",
    "build_demo_processor",
    "build_demo_tokenizer",
    "calibration_dataset",
    "demo_calibration_set",
    "demo_model_path",
    "demo_words",
    "encode_prompt",
    "load_demo_model",
    "pixel_values",
    "prompt_batch",
    "save_demo_processor",
]

IMAGE_TOKENS = (IMAGE_SIZE // CELL) ** 2
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<image>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID, UNK_ID = range(5)
VOCAB_SIZE = 2048


def demo_words() -> list[str]:
    """The tokenizer's words in id order: specials, the task words, then the corpus's commonest."""
    fixed = [*SPECIAL_TOKENS, *vocabulary()]
    return fixed + frequent_words(VOCAB_SIZE - len(fixed), exclude=fixed)


def build_demo_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``demo_words()`` (other words read as ``<unk>``)."""
    vocab = {w: i for i, w in enumerate(demo_words())}
    return word_level_tokenizer(vocab, unk_token="<unk>", padding_side="left")


# A conversation as the demo was trained on it: "<s>", "<image>" for each image, the words.
# The demo has no roles or turns (one question, answered by the next token), so every
# message's parts are written in order and nothing follows for the answer.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> "
    "{% elif part['type'] == 'text' %}{{ part['text'] }} {% endif %}"
    "{% endfor %}{% endif %}"
    "{% endfor %}"
)


def build_demo_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """The processor that turns a chat or a ``<image>`` prompt and an image into the
    demo's inputs, as vLLM (or ``AutoProcessor``) builds them: pixels as in
    ``pixel_values`` (``x / 127.5 - 1`` is rescale 1/255, then mean = std = 0.5; no
    resize or crop, the images are 64 x 64 already) and ``<image>`` expanded to
    ``IMAGE_TOKENS`` placeholders (one per patch, the CLS token dropped)."""
    # The PIL implementation (torchvision's needs torchvision); saved as "CLIPImageProcessor",
    # which every reader, vLLM's included, loads with the implementation it has.
    images = CLIPImageProcessorPil(
        do_resize=False, do_center_crop=False, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=CELL,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )


def save_demo_processor(tokenizer: PreTrainedTokenizerFast, path: str | os.PathLike) -> None:
    """Write the demo's processor files to ``path`` in both layouts: transformers 5's
    ``processor_config.json`` (image processor inside) and the ``preprocessor_config.json``
    older readers look for."""
    processor = build_demo_processor(tokenizer)
    processor.save_pretrained(path)
    processor.image_processor.save_pretrained(path)


def build_demo_model(
    seed: int = 0, *, text_layers: int = 6, text_intermediate: int = 384
) -> LlavaForConditionalGeneration:
    """The untrained demo model (eager attention, float32), seeded; ``text_layers`` and
    ``text_intermediate`` size the language model (its depth, its MLP width)."""
    vision = CLIPVisionConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=CELL, projection_dim=128,
    )
    text = LlamaConfig(
        hidden_size=128, intermediate_size=text_intermediate, num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=256,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_ID, image_seq_length=IMAGE_TOKENS,
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        pad_token_id=PAD_ID,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def encode_prompt(question: Question, tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Token ids of ``question``'s prompt, image placeholders expanded."""
    words = tokenizer(question.prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.pad_token_id in words or tokenizer.unk_token_id in words:
        raise ValueError(f"prompt {question.prompt!r} has words outside the demo vocabulary")
    image = [IMAGE_ID] * IMAGE_TOKENS if question.image is not None else []
    return [BOS_ID, *image, *words]


def pixel_values(images: list[np.ndarray]) -> torch.Tensor:
    """``[B, 3, 64, 64]`` float32 in [-1, 1] from uint8 ``[64, 64, 3]`` images."""
    array = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def prompt_batch(questions: list[Question], tokenizer, *, with_answers: bool = False) -> dict:
    """Left-padded model inputs for ``questions`` (the next token after each
    prompt is its answer); ``with_answers`` appends the answers as last token."""
    rows = [encode_prompt(q, tokenizer) for q in questions]
    if with_answers:
        rows = [r + [tokenizer.convert_tokens_to_ids(q.answer)] for r, q in zip(rows, questions)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    images = [q.image for q in questions if q.image is not None]
    if images:
        batch["pixel_values"] = pixel_values(images)
    return batch


def calibration_dataset(questions: list[Question], tokenizer):
    """An llm-compressor calibration set: one row per image question, prompt and
    answer, with the batch dimension the processor would give (``[1, L]``).

    Text-only questions are left out: rows must share columns, and multimodal
    calibration data is what the methods are meant for (as in the paper).
    """
    from datasets import Dataset

    rows = [prompt_batch([q], tokenizer, with_answers=True) for q in questions if q.image is not None]
    if not rows:
        raise ValueError("the calibration set needs image questions")
    return Dataset.from_dict({k: [r[k].numpy() for r in rows] for k in rows[0]}).with_format("torch")


def demo_calibration_set(tokenizer, samples: int, seed: int = 0):
    """``samples`` image questions of the calibration split, families in turn, as a dataset."""
    from tamp_modifier.demo.tasks import IMAGE_FAMILIES, make_split

    per_family = -(-samples // len(IMAGE_FAMILIES))
    questions = make_split("calibration", per_family, seed, families=IMAGE_FAMILIES)[:samples]
    return calibration_dataset(questions, tokenizer)


def demo_model_path() -> Path:
    """Folder of the shipped, trained demo model (config, weights, tokenizer)."""
    return Path(str(resources.files("tamp_modifier.demo") / "weights"))


def load_demo_model(path: str | os.PathLike | None = None):
    """``(model, tokenizer)`` of the trained demo model (shipped one by default)."""
    path = Path(path) if path is not None else demo_model_path()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no demo model at {path}: train one with `python -m tamp_modifier.demo.train --output {path}`"
        )
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    return model, tokenizer
