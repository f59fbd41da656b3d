"""Build a multimodal calibration set for tamp-prune / oneshot from images (and captions).

Each row is one processor output (input_ids [1, L], attention_mask, pixel_values,
and whatever the model family needs: image_sizes for LLaVA-NeXT, image_grid_thw
and mm_token_type_ids for Qwen2-VL/2.5-VL), so it needs no further processing.

From a folder of your own images, offline (captions optional: ``cat.png`` takes
its caption from ``cat.txt`` beside it; without one the sample is the question
alone):

    python examples/calibration.py --model my-model --images my-images --samples 128 --output my-calib
    tamp-prune my-model --dataset my-calib --output my-model-tamp

Or from a Hugging Face dataset with ``image`` and ``caption`` columns (needs the
hub; default lmms-lab/flickr30k, as llm-compressor's own vision examples use):

    python examples/calibration.py --model Qwen/Qwen2.5-VL-7B-Instruct --samples 128 --output calib-qwen
"""

import argparse
from pathlib import Path

from datasets import Dataset
from transformers import AutoProcessor

PROMPT = "What does the image show?"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


def processed_rows(processor, pairs):
    """Yield one processed sample per (image, caption): a user turn with the image
    and a question, and the caption (if any) as the assistant's answer."""
    for image, caption in pairs:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
        if caption:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": caption}]})
        text = processor.apply_chat_template(messages, tokenize=False)
        row = processor(text=[text], images=[image], return_tensors="pt")
        yield dict(row)


def rows_to_dataset(rows) -> Dataset:
    ds = Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows])
    ds.set_format("torch")
    return ds


def image_folder_pairs(folder, samples: int):
    """(image, caption or None) for the first ``samples`` images of a folder, by name."""
    from PIL import Image

    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"calibration: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    for path in paths[:samples]:
        caption = path.with_suffix(".txt")
        yield Image.open(path).convert("RGB"), caption.read_text().strip() if caption.is_file() else None


def build_calibration_set(processor, dataset="lmms-lab/flickr30k", split="test", samples=128, seed=42):
    """From a hub dataset with ``image`` and ``caption`` columns."""
    from datasets import load_dataset

    source = load_dataset(dataset, split=f"{split}[:{samples * 4}]").shuffle(seed=seed).select(range(samples))
    captions = [c[0] if isinstance(c, list) else c for c in source["caption"]]
    return rows_to_dataset(processed_rows(processor, zip(source["image"], captions)))


def build_from_images(processor, folder, samples=128) -> Dataset:
    """From a local folder of images (and optional same-name .txt captions)."""
    return rows_to_dataset(processed_rows(processor, image_folder_pairs(folder, samples)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder (or hub name) whose processor is used")
    parser.add_argument("--images", help="a local folder of images; no hub needed")
    parser.add_argument("--dataset", default="lmms-lab/flickr30k", help="hub dataset, when --images is not given")
    parser.add_argument("--split", default="test")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--output", required=True, help="folder to write (datasets' save_to_disk)")
    args = parser.parse_args()
    processor = AutoProcessor.from_pretrained(args.model)
    if args.images:
        ds = build_from_images(processor, args.images, args.samples)
    else:
        ds = build_calibration_set(processor, args.dataset, args.split, args.samples)
    ds.save_to_disk(args.output)
    print(f"saved {len(ds)} calibration samples to {args.output}")
