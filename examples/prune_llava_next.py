"""TAMP's DAS + Wanda at 50% on LLaVA-NeXT with oneshot, then save for vLLM.

    python examples/prune_llava_next.py [--model llava-hf/llava-v1.6-mistral-7b-hf]

Needs a GPU for a 7B model in reasonable time, and hub access for the weights
and the calibration images. The pruned checkpoint is a plain dense checkpoint
(llm-compressor 0.14 writes no sparse format), plus recipe.yaml and
tamp_report.json (per-layer scores and ratios).
"""

import argparse
from pathlib import Path

import torch
from calibration import build_calibration_set
from llmcompressor import oneshot
from transformers import AutoModelForImageTextToText, AutoProcessor

import tamp_modifier  # noqa: F401  registers DiversityAwareSparsity for the YAML recipe
from tamp_modifier.data import collate_rows
from tamp_modifier.models import text_decoder_layer_class

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="llava-hf/llava-v1.6-mistral-7b-hf")
parser.add_argument("--recipe", default=str(RECIPES / "das_wanda.yaml"))
parser.add_argument("--samples", type=int, default=128)
parser.add_argument("--output", default="llava-v1.6-mistral-7b-TAMP-DAS-50")
args = parser.parse_args()

model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.bfloat16)
processor = AutoProcessor.from_pretrained(args.model)
dataset = build_calibration_set(processor, samples=args.samples)

oneshot(
    model=model,
    processor=processor,
    dataset=dataset,
    recipe=args.recipe,
    num_calibration_samples=args.samples,
    max_seq_length=4096,
    data_collator=collate_rows,  # rows already carry the batch dimension
    sequential_targets=[text_decoder_layer_class(model)],  # MistralDecoderLayer
    output_dir=args.output,
)
