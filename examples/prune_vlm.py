"""Prune a real vision-language checkpoint with a TAMP recipe in oneshot.

    python examples/prune_vlm.py --model Qwen/Qwen2.5-VL-7B-Instruct
    python examples/prune_vlm.py --model llava-hf/llava-v1.6-mistral-7b-hf
    python examples/prune_vlm.py --model Qwen/Qwen2-VL-7B-Instruct --recipe recipes/das_wanda.yaml
    python examples/prune_vlm.py --model my-model --images my-images     # offline: local model and images
    python examples/prune_vlm.py --model my-model --dataset my-calib     # a set calibration.py saved

The same code serves LLaVA, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL: the calibration
rows are the processor's own outputs, and the sequential target is the language
model's decoder layer class (Qwen2_5_VLDecoderLayer, MistralDecoderLayer, ...).

Needs a GPU for a 7B model in reasonable time, and hub access for hub names and
for the default calibration images (flickr30k); with a local model folder and
--images or --dataset it runs offline. The pruned checkpoint is a plain dense checkpoint
(llm-compressor 0.14 writes no sparse format), plus recipe.yaml and
tamp_report.json (per-layer scores and ratios).
"""

import argparse
from pathlib import Path

import torch
from calibration import build_calibration_set, build_from_images
from datasets import load_from_disk
from llmcompressor import oneshot
from transformers import AutoModelForImageTextToText, AutoProcessor

import tamp_modifier  # noqa: F401  registers TAMP's modifiers for the YAML recipe
from tamp_modifier.calibration_data import collate_rows
from tamp_modifier.text_decoder import text_decoder_layer_class

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct")
parser.add_argument("--recipe", default=str(RECIPES / "tamp.yaml"))
parser.add_argument("--samples", type=int, default=128)
parser.add_argument("--images", help="calibrate on a local folder of images (and same-name .txt captions)")
parser.add_argument("--dataset", help="calibrate on a folder saved by examples/calibration.py")
parser.add_argument("--output", help="default: <model name>-TAMP")
args = parser.parse_args()
output = args.output or args.model.rstrip("/").split("/")[-1] + "-TAMP"

model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.bfloat16)
processor = AutoProcessor.from_pretrained(args.model)
if args.dataset:
    dataset = load_from_disk(args.dataset).with_format("torch")
elif args.images:
    dataset = build_from_images(processor, args.images, args.samples)
else:
    dataset = build_calibration_set(processor, samples=args.samples)

oneshot(
    model=model,
    processor=processor,
    dataset=dataset,
    recipe=args.recipe,
    num_calibration_samples=min(args.samples, len(dataset)),
    max_seq_length=4096,
    data_collator=collate_rows,  # rows already carry the batch dimension
    sequential_targets=[text_decoder_layer_class(model)],
    output_dir=output,
)
