"""Give each tiny family model of ``vllm_families.py build`` its real processor, and the inputs it makes.

Runs in the vLLM environment (transformers 5.19, with torchvision, which Qwen's video processor
needs); imports nothing of this project:

    .venv-vllm/bin/python scripts/vllm_family_inputs.py DIR/FAMILY [DIR/FAMILY ...]

For each folder: builds the family's transformers processor (image processor sized to the tiny
tower, the saved tokenizer and chat template), saves it into ``FAMILY/dense`` (``tamp-prune``
copies those files into every checkpoint it writes), then runs it on each chat of
``questions.json`` as vLLM does (``apply_chat_template`` with the generation prompt, then the
processor on that text and the image) and saves the result, chat ``i``'s tensors under ``i/NAME``,
as ``FAMILY/inputs.safetensors``: the inputs transformers is run on in ``vllm_families.py
reference``, and those vLLM builds itself from the same files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _qwen_processor(folder: Path, config: dict, family: str):
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    vision = config["vision_config"]
    p, m, t = vision["patch_size"], vision["spatial_merge_size"], vision["temporal_patch_size"]
    # 32 x 32 to 64 x 64 pixels: the 64 x 64 images sent are taken as they are (no resize).
    size = {"shortest_edge": 32 * 32, "longest_edge": 64 * 64}
    kwargs = dict(patch_size=p, merge_size=m, temporal_patch_size=t, size=size)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    cls, video = {"qwen2_vl": (Qwen2VLProcessor, Qwen2VLVideoProcessor),
                  "qwen2_5_vl": (Qwen2_5_VLProcessor, Qwen2VLVideoProcessor),
                  "qwen3_vl": (Qwen3VLProcessor, Qwen3VLVideoProcessor)}[family]
    return cls(image_processor=Qwen2VLImageProcessor(**kwargs), tokenizer=tokenizer,
               video_processor=video(**kwargs), chat_template=tokenizer.chat_template)


def _llava_next_processor(folder: Path, config: dict, family: str):
    from transformers import AutoTokenizer, LlavaNextImageProcessor, LlavaNextProcessor

    vision = config["vision_config"]
    side = vision["image_size"]
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side},
        image_grid_pinpoints=config["image_grid_pinpoints"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision["patch_size"],
        vision_feature_select_strategy=config["vision_feature_select_strategy"],
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=tokenizer.chat_template)


def _llava_onevision_processor(folder: Path, config: dict, family: str):
    from transformers import AutoTokenizer, LlavaOnevisionImageProcessor, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.video_processing_llava_onevision import (
        LlavaOnevisionVideoProcessor,
    )

    vision = config["vision_config"]
    side = vision["image_size"]
    sizes = dict(size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(image_grid_pinpoints=config["image_grid_pinpoints"],
                                                     **sizes),
        tokenizer=tokenizer, video_processor=LlavaOnevisionVideoProcessor(**sizes),
        num_image_tokens=(side // vision["patch_size"]) ** 2,
        vision_feature_select_strategy=config["vision_feature_select_strategy"],
        vision_aspect_ratio=config["vision_aspect_ratio"], chat_template=tokenizer.chat_template)


def _gemma3_processor(folder: Path, config: dict, family: str):
    from transformers import AutoTokenizer, Gemma3ImageProcessor, Gemma3Processor

    side = config["vision_config"]["image_size"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": side, "width": side}, image_mean=[0.5] * 3,
                                             image_std=[0.5] * 3),
        tokenizer=tokenizer, image_seq_length=config["mm_tokens_per_image"],
        chat_template=tokenizer.chat_template)


def _internvl_processor(folder: Path, config: dict, family: str):
    from transformers import AutoTokenizer, GotOcr2ImageProcessor, InternVLProcessor
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    vision = config["vision_config"]
    side, patch = vision["image_size"][0], vision["patch_size"][0]
    sizes = dict(size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(crop_to_patches=False, **sizes), tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(**sizes),
        image_seq_length=int((side // patch) ** 2 * config["downsample_ratio"] ** 2),
        chat_template=tokenizer.chat_template)


def _mistral3_processor(folder: Path, config: dict, family: str):
    from transformers import AutoTokenizer, PixtralImageProcessor, PixtralProcessor

    vision = config["vision_config"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return PixtralProcessor(
        image_processor=PixtralImageProcessor(size={"longest_edge": vision["image_size"]},
                                              patch_size={"height": vision["patch_size"],
                                                          "width": vision["patch_size"]},
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tokenizer, patch_size=vision["patch_size"], spatial_merge_size=config["spatial_merge_size"],
        chat_template=tokenizer.chat_template)


def _idefics3_processor(folder: Path, config: dict, family: str):
    from transformers import (
        AutoTokenizer,
        Idefics3ImageProcessor,
        Idefics3Processor,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
    )
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    vision = config["vision_config"]
    side = vision["image_size"]
    sizes = dict(size={"longest_edge": side}, max_image_size={"longest_edge": side}, do_image_splitting=False,
                 image_mean=[0.5] * 3, image_std=[0.5] * 3)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    seq_len = int((side // vision["patch_size"]) ** 2 / config["scale_factor"] ** 2)
    if family == "idefics3":
        return Idefics3Processor(image_processor=Idefics3ImageProcessor(**sizes), tokenizer=tokenizer,
                                 image_seq_len=seq_len, chat_template=tokenizer.chat_template)
    return SmolVLMProcessor(image_processor=SmolVLMImageProcessor(**sizes), tokenizer=tokenizer,
                            video_processor=SmolVLMVideoProcessor(**sizes), image_seq_len=seq_len,
                            chat_template=tokenizer.chat_template)


PROCESSORS = {"llava_next": _llava_next_processor, "llava_onevision": _llava_onevision_processor,
              "qwen2_vl": _qwen_processor, "qwen2_5_vl": _qwen_processor, "qwen3_vl": _qwen_processor,
              "gemma3": _gemma3_processor, "internvl": _internvl_processor, "mistral3": _mistral3_processor,
              "idefics3": _idefics3_processor, "smolvlm": _idefics3_processor}


def main(argv: list[str]) -> int:
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    for given in argv:
        folder = Path(given)
        family = folder.name
        dense = folder / "dense"
        config = json.loads((dense / "config.json").read_text())
        processor = PROCESSORS[family](dense, config, family)
        processor.save_pretrained(dense)
        questions = json.loads((folder / "questions.json").read_text())
        tensors = {}
        for i, q in enumerate(questions):
            content = [{"type": "image"}, {"type": "text", "text": q["prompt"]}]
            messages = [{"role": "user", "content": content}]
            text = processor.apply_chat_template(messages, add_generation_prompt=True)
            image = Image.open(folder / q["image"]).convert("RGB")
            out = processor(text=[text], images=[image], return_tensors="pt")
            for name, value in out.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{i}/{name}"] = value.contiguous()
        save_file(tensors, folder / "inputs.safetensors")
        names = sorted({k.split("/", 1)[1] for k in tensors})
        print(f"vllm_family_inputs: {family}: {type(processor).__name__} saved; {len(questions)} chats -> "
              f"{', '.join(names)} (first prompt {tensors['0/input_ids'].shape[1]} tokens)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
