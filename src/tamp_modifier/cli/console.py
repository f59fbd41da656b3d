"""What ``tamp-prune`` prints: the libraries' messages, less their known noise.

Each pattern below is a message that every run on an ordinary machine prints and
that asks nothing of the user (``--verbose`` shows them all):

- llm-compressor's "No accelerator available!" (once per pipeline, on a CPU);
- llm-compressor's "Failed to find ['torch_dtype', 'dtype'] key in original
  config" and the "Failed to modify config" that follows it (the demo folder's
  config has no dtype; transformers' saved config is kept, and it has one);
- transformers' "Attempting to save a model with offloaded modules ...
  ``shard_size`` (50GB default)" (llm-compressor's CPU offload wrappers);
- torch.fx's "is_fx_tracing will return true ..." (llm-compressor's tracing);
- the tokenizers library's fork warning (no parallel tokenising happens here).

llm-compressor's own import-time warnings are kept out by ``arguments.main``,
which disables its logger before importing it; ``library_logs`` enables it
again behind the filter. Log lines that name the run's hidden staging folder name the output folder
instead: that is where the files are once the run succeeds.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings

__all__ = ["NOISE", "is_noise", "library_logs"]

NOISE = (
    "No accelerator available",
    "key in original config",
    "Failed to modify config. Keeping the transformers-serialized config",
    "is_fx_tracing will return true",
    "Disabling tokenizer parallelism",
    "Attempting to save a model with offloaded modules",
)


def is_noise(message: str) -> bool:
    return any(pattern in message for pattern in NOISE)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not is_noise(record.getMessage())


@contextlib.contextmanager
def library_logs(verbose: bool):
    """One console handler for every loguru message (llm-compressor's and ours), while inside.

    :param verbose: keep the noise and show DEBUG messages (per-layer tables)
    :yield: a dict of text replaced in every later message; fill it in
        (staging folder -> output folder) once the names are known

    On exit loguru is left as loguru starts (one stderr handler), so a caller in
    the same process (a test, a notebook) is not left writing to our stream.
    """
    from llmcompressor.logger import support_log_once
    from loguru import logger

    renames: dict[str, str] = {}

    def rename(record) -> None:
        for old, new in renames.items():
            record["message"] = record["message"].replace(old, new)

    logger.remove()
    logger.enable("llmcompressor")
    try:
        logger.level("METRIC")
    except ValueError:  # llm-compressor adds its level only when its logger starts enabled
        logger.level("METRIC", no=38, color="<yellow>")
    logger.configure(patcher=rename)
    logger.add(
        sys.stdout,
        level="DEBUG" if verbose else "INFO",
        format="{time:HH:mm:ss} | {level} - {message}",
        filter=lambda record: support_log_once(record) and (verbose or not is_noise(record["message"])),
    )
    fx_log, drop = logging.getLogger("torch.fx._symbolic_trace"), _DropNoise()
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.filterwarnings("ignore", message=".*offloaded modules.*shard_size.*")
                fx_log.addFilter(drop)
            yield renames
    finally:
        fx_log.removeFilter(drop)
        logger.remove()
        logger.configure(patcher=None)
        logger.add(sys.stderr)
