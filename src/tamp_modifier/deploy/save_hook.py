"""What saving a model pruned by our modifiers does besides llm-compressor's own save.

Our modifiers call ``install_save_hook`` on the model they prune. From then on
``save_pretrained`` (llm-compressor's, which ``oneshot(output_dir=...)`` calls, or
a later one of the user's) also makes the checkpoint loadable by transformers 5 and
vLLM (``checkpoint.finalize_checkpoint``: hub weight names, the ignore list under
both namings, ``config.json`` without ``sparsity_config``) and writes
``tamp_report.json`` beside it (``report_writer``). llm-compressor adds
``recipe.yaml`` the same way, by wrapping ``save_pretrained``.
"""

from __future__ import annotations

import functools

import torch

from tamp_modifier.deploy.checkpoint import finalize_checkpoint
from tamp_modifier.deploy.report_writer import write_report

__all__ = ["install_save_hook"]


def install_save_hook(model: torch.nn.Module) -> None:
    """Make ``model.save_pretrained`` finalise the checkpoint and write the report (once per model)."""
    save = getattr(model, "save_pretrained", None)
    if save is None or getattr(save, "_tamp_report", False):
        return

    @functools.wraps(save)
    def save_pretrained_with_report(save_directory, *args, **kwargs):
        from compressed_tensors.distributed import is_source_process

        result = save(save_directory, *args, **kwargs)
        if is_source_process():  # under torchrun, one rank writes the files (all hold the same model)
            changes = finalize_checkpoint(model, save_directory)
            write_report(model, save_directory, checkpoint={"config_changes": changes})
        return result

    # functools.wraps copied llm-compressor's `_overridden` flag, so it will
    # not try to wrap this function again (it would need a bound method).
    save_pretrained_with_report._tamp_report = True
    model.save_pretrained = save_pretrained_with_report
