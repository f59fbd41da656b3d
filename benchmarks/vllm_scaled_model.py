"""A random LLaVA with a 7B model's proportions, scaled down, and a calibration set for it.

For the vLLM throughput benchmark (``benchmarks/vllm_throughput.sh``): the demo model is so small
that vLLM's fixed costs per step hide any difference between formats, so the formats are also
timed on a model whose Linears have a 7B Llama's shape ratios (MLP width 2.75 x the hidden width,
as many key-value heads as query heads, a 32,000-word vocabulary) at 1/4 of its width and 1/4 of
its depth, and a CLIP tower at 224 pixels in 14-pixel patches (256 image tokens, as in LLaVA at
that size). Weights are random: throughput does not depend on their values.

    python benchmarks/vllm_scaled_model.py --output DIR

writes ``DIR/dense`` (weights, tokenizer, processor: loadable by transformers and vLLM) and
``DIR/calibration`` (rows for ``tamp-prune DIR/dense --dataset DIR/calibration``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def calibration_set(processor, samples: int, seed: int):
    """Processor outputs (``[1, L]`` rows) for demo questions on their images, upscaled to 224."""
    from datasets import Dataset
    from PIL import Image

    from tamp_modifier.demo.tasks import IMAGE_FAMILIES, make_split

    rows = []
    for q in make_split("calibration", -(-samples // len(IMAGE_FAMILIES)), seed, families=IMAGE_FAMILIES)[:samples]:
        image = Image.fromarray(q.image).resize((224, 224), Image.NEAREST)
        inputs = processor(text=f"<s> <image> {q.prompt}", images=[image], return_tensors="np",
                           add_special_tokens=False)
        rows.append({k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")})
    return Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]}).with_format("torch")


def build(output: Path, seed: int = 0) -> None:
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from tamp_modifier.demo.model import CHAT_TEMPLATE, build_demo_tokenizer
    from tamp_modifier.deploy.checkpoint import rename_saved_weights

    vision = CLIPVisionConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                              image_size=224, patch_size=14, projection_dim=512)
    # Llama-2-7B: hidden 4096, MLP 11008, 32 layers, 32 heads, vocab 32000. Here 1/4 of the width and of
    # the depth; the MLP 2816 (2.75 x) so that groups of 128 columns divide every Linear (W4A16).
    text = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                       num_key_value_heads=16, vocab_size=32000, max_position_embeddings=1024,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=3, image_seq_length=256,
                         vision_feature_layer=-1, vision_feature_select_strategy="default", pad_token_id=0)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    dense = output / "dense"
    model.save_pretrained(dense)
    rename_saved_weights(model, dense)  # the hub's CLIP naming, which vLLM loads
    # The demo's word-level tokenizer (its ids are all below 64, the rest of the vocabulary is never
    # produced by it but is still computed by lm_head) and CLIP's usual image processing.
    tokenizer = build_demo_tokenizer()
    images = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                   image_mean=[0.4815, 0.4578, 0.4082], image_std=[0.2686, 0.2613, 0.2758])
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                               num_additional_image_tokens=1, vision_feature_select_strategy="default",
                               chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(dense)
    images.save_pretrained(dense)
    calibration_set(processor, 16, seed).save_to_disk(str(output / "calibration"))
    params = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    print(f"vllm_scaled_model: {params / 1e6:.0f}M language-model parameters -> {dense}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, type=Path, metavar="DIR")
    args = parser.parse_args(argv)
    build(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
