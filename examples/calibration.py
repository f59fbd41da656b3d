"""Build a multimodal calibration set for tamp-prune / oneshot from image-caption pairs.

Each row is one processor output (input_ids [1, L], attention_mask, pixel_values,
and whatever the model family needs: image_sizes for LLaVA-NeXT, image_grid_thw
and mm_token_type_ids for Qwen2-VL/2.5-VL), so it needs no further processing:

    python examples/calibration.py --model Qwen/Qwen2.5-VL-7B-Instruct \
        --samples 128 --output calib-qwen
    tamp-prune Qwen2.5-VL-7B-Instruct/ --dataset calib-qwen --output pruned/

Images come from a Hugging Face dataset with `image` and `caption` columns
(default lmms-lab/flickr30k, as llm-compressor's own vision examples use).
"""

import argparse

from datasets import Dataset, load_dataset
from transformers import AutoProcessor

PROMPT = "What does the image show?"


def processed_rows(processor, pairs):
    """Yield one processed sample per (image, caption): a user turn with the image
    and a question, and the caption as the assistant's answer."""
    for image, caption in pairs:
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
            {"role": "assistant", "content": [{"type": "text", "text": caption}]},
        ]
        text = processor.apply_chat_template(messages, tokenize=False)
        row = processor(text=[text], images=[image], return_tensors="pt")
        yield dict(row)


def build_calibration_set(processor, dataset="lmms-lab/flickr30k", split="test", samples=128, seed=42):
    source = load_dataset(dataset, split=f"{split}[:{samples * 4}]").shuffle(seed=seed).select(range(samples))
    captions = [c[0] if isinstance(c, list) else c for c in source["caption"]]
    rows = list(processed_rows(processor, zip(source["image"], captions)))
    ds = Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows])
    ds.set_format("torch")
    return ds


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", default="lmms-lab/flickr30k")
    parser.add_argument("--split", default="test")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    processor = AutoProcessor.from_pretrained(args.model)
    build_calibration_set(processor, args.dataset, args.split, args.samples).save_to_disk(args.output)
    print(f"saved {args.samples} calibration samples to {args.output}")
