"""Modality labels of every calibration token, recorded as samples flow in.

llm-compressor's sequential pipeline feeds each sample's input ids to the first
subgraph, where the input embeddings see them raw (placeholders intact), while
``state.current_batch_idx`` names the sample; later subgraphs only see hidden
states. So labels are recorded from an embedding pre-hook, keyed by sample, and
padding is read from the decoder blocks' attention masks (a padded token cannot
even attend to itself). Hooks go through the modifier's ``register_hook`` so
llm-compressor silences them in its propagation passes.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import torch
from llmcompressor.core import active_session

from tamp_modifier.modifiers.distributed import gather_objects, is_distributed
from tamp_modifier.pruning.modality import PADDING, label_tokens

__all__ = ["CalibrationTokenLabels"]


class CalibrationTokenLabels:
    """Per-sample token labels: 0 text, k the k-th modality, -1 padding."""

    def __init__(self, modality_token_ids: dict[str, list[int]]):
        self.modality_token_ids = modality_token_ids
        self._labels: dict[int, torch.Tensor] = {}
        self._fingerprints: dict[int, list[int]] = {}
        self._padding_read: set[int] = set()

    def attach(self, modifier, model: torch.nn.Module, blocks: Iterable[torch.nn.Module]) -> None:
        modifier.register_hook(model.get_input_embeddings(), self._record_ids, "forward_pre")
        for block in blocks:
            modifier.register_hook(block, self._record_padding, "forward_pre", with_kwargs=True)

    def _record_ids(self, _module, args):
        input_ids = args[0] if args else None
        if isinstance(input_ids, torch.Tensor) and not input_ids.is_floating_point():
            batch = active_session().state.current_batch_idx
            ids = input_ids.detach().cpu()
            self._labels[batch] = label_tokens(ids, self.modality_token_ids)
            rows = ids.reshape(-1, ids.shape[-1])
            self._fingerprints[batch] = [zlib.crc32(row.numpy().tobytes()) for row in rows]

    def _record_padding(self, _module, _args, kwargs):
        batch = active_session().state.current_batch_idx
        if batch in self._padding_read or batch not in self._labels:
            return
        self._padding_read.add(batch)
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
            return
        diag = mask[:, 0].diagonal(dim1=-2, dim2=-1)
        real = diag if diag.dtype == torch.bool else diag > torch.finfo(diag.dtype).min / 2
        labels = self._labels[batch]
        if real.shape == labels.shape:
            labels[~real.cpu()] = PADDING

    def current(self, shape: torch.Size) -> torch.Tensor:
        """Labels of the sample now running, shaped like a layer's ``[B, L]`` tokens."""
        batch = active_session().state.current_batch_idx
        labels = self._labels.get(batch)
        if labels is None:
            raise ValueError(
                f"did not see the input_ids of calibration sample {batch}; calibrate "
                "with input_ids (not inputs_embeds)"
            )
        return labels if labels.shape == shape else labels.reshape(shape)

    def fingerprint(self, row: int) -> int:
        """Checksum of a row's input ids: names a sample whatever the data order."""
        return self._fingerprints[active_session().state.current_batch_idx][row]

    def counts(self, num_modalities: int) -> list[int]:
        """Tokens seen per label 0..num_modalities-1, padding excluded."""
        seen = torch.zeros(num_modalities, dtype=torch.long)
        for labels in self._labels.values():
            seen += torch.bincount(labels[labels >= 0].long(), minlength=num_modalities)[:num_modalities]
        return seen.tolist()

    def check_ranks_distinct(self) -> None:
        """Under torchrun: raise if every rank calibrated on the very same samples.

        That is what llm-compressor 0.14.0.1 does when all ranks pass one whole
        dataset (each gets the first rank's share), and the run would then see
        1/N of the data N times. Collective: every rank must call it.
        """
        if not is_distributed():
            return
        mine = sorted(f for rows in self._fingerprints.values() for f in rows)
        everyone = gather_objects(mine)
        if mine and all(other == mine for other in everyone):
            raise ValueError(
                f"all {len(everyone)} ranks calibrated on the same {len(mine)} samples: "
                "llm-compressor 0.14 hands every rank the first rank's share when all ranks "
                "pass one whole dataset. Give each rank its own share before oneshot: "
                "`dataset = tamp_modifier.modifiers.distributed.rank_share(dataset)`"
            )

    def __bool__(self) -> bool:
        return bool(self._labels)

    def __len__(self) -> int:
        """Samples recorded."""
        return len(self._labels)

    def keep_first(self, count: int) -> None:
        """Forget every sample from index ``count`` on (DAS's ``profile_samples``)."""
        for batch in [b for b in self._labels if b >= count]:
            del self._labels[batch]
            self._fingerprints.pop(batch, None)
            self._padding_read.discard(batch)

    def clear(self) -> None:
        self._labels.clear()
        self._fingerprints.clear()
        self._padding_read.clear()
