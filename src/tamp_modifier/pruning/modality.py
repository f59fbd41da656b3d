"""Which modality each token belongs to.

A token's modality comes from its input id: the model config's placeholder ids
(``image_token_id``/``image_token_index``, ``video_token_id``, ``audio_token_id``
...), or a mapping the recipe gives (``modality_token_ids: {image: [...]}``).
Everything else is text. Padding (``attention_mask == 0``) is no token at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "PADDING",
    "TEXT",
    "label_tokens",
    "modality_token_ids_from_config",
    "resolve_modality_token_ids",
]

TEXT = 0
PADDING = -1

# Placeholder-id attribute names transformers configs use, per modality.
_CONFIG_KEYS = {
    "image": ("image_token_id", "image_token_index"),
    "video": ("video_token_id", "video_token_index"),
    "audio": ("audio_token_id", "audio_token_index"),
}


def modality_token_ids_from_config(config) -> dict[str, list[int]]:
    """Placeholder token ids the model config declares, per non-text modality."""
    found: dict[str, list[int]] = {}
    for modality, keys in _CONFIG_KEYS.items():
        for key in keys:
            value = getattr(config, key, None)
            if isinstance(value, int) and value >= 0:
                found.setdefault(modality, [])
                if value not in found[modality]:
                    found[modality].append(value)
    return found


def resolve_modality_token_ids(
    config, mapping: Mapping[str, Sequence[int]] | None = None
) -> dict[str, list[int]]:
    """The user's mapping when given (validated), else the config's placeholders."""
    if mapping is None:
        return modality_token_ids_from_config(config)
    resolved: dict[str, list[int]] = {}
    owner: dict[int, str] = {}
    for modality, ids in mapping.items():
        if modality == "text":
            raise ValueError(
                "modality_token_ids must not list 'text': every token not listed is text"
            )
        ids = [ids] if isinstance(ids, int) else list(ids)
        if not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ValueError(
                f"modality_token_ids[{modality!r}] must be a non-empty list of token ids "
                f"(non-negative ints), got {ids!r}"
            )
        for i in ids:
            if i in owner:
                raise ValueError(
                    f"token id {i} is listed for both {owner[i]!r} and {modality!r} in "
                    "modality_token_ids; give each id one modality"
                )
            owner[i] = modality
        resolved[modality] = ids
    return resolved


def label_tokens(
    input_ids: torch.Tensor,
    modality_token_ids: Mapping[str, Sequence[int]],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integer modality per token: 0 text, k the k-th listed modality, -1 padding.

    :param input_ids: ``[..., L]`` token ids
    :param modality_token_ids: non-text modality -> its placeholder ids, in the
        order that numbers them (1, 2, ...)
    :param attention_mask: same shape; zeros mark padding
    """
    labels = torch.full(input_ids.shape, TEXT, dtype=torch.int8, device=input_ids.device)
    for k, ids in enumerate(modality_token_ids.values(), start=1):
        ids_t = torch.as_tensor(list(ids), device=input_ids.device)
        labels[torch.isin(input_ids, ids_t)] = k
    if attention_mask is not None:
        labels[attention_mask.to(input_ids.device) == 0] = PADDING
    return labels
