"""llm-compressor's sequential pipeline, shortened for a modifier that only observes.

The sequential pipeline runs every subgraph twice per sample: a calibration pass
with the modifiers' hooks on, then a propagation pass with hooks off, whose
outputs (those of the just-compressed subgraph) feed the next subgraph. A
modifier that changes no weight, such as DiversityAwareSparsity, makes the
second pass recompute exactly the outputs of the first. The pipeline itself
skips that pass when ``dataset_args.propagate_error`` is False (the calibration
pass's outputs then feed the next subgraph), but a modifier is not handed
``dataset_args``: it is a local of ``SequentialPipeline.__call__``, the frame
that sends the calibration events. So the observer finds that frame on the call
stack, switches the flag off for that one pipeline run, and puts it back when
its calibration ends, before the next modifier's pipeline starts. For the same
reason it can also drop samples from that run's activation cache after the
first subgraph, so later subgraphs run on fewer samples.

Only when every modifier running in the pipeline observes: with the default
``independent`` pipeline each modifier runs alone, so a pruner later in the
recipe keeps its own two passes and all its samples. Where the frame is not
found (another pipeline, another llm-compressor version), nothing changes: the
result is the same, only slower.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from llmcompressor.pipelines.sequential.pipeline import SequentialPipeline
from loguru import logger

__all__ = ["ObservedPipelineRun"]

# The undecorated function (handle_sequential_oom wraps it with functools.wraps).
_PIPELINE_CODE = inspect.unwrap(SequentialPipeline.__call__).__code__


def _pipeline_local(name: str):
    """A local variable of the sequential pipeline run that called us, or None."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code is _PIPELINE_CODE:
                return frame.f_locals.get(name)
            frame = frame.f_back
        return None
    finally:
        del frame  # a frame reference kept here would keep every caller's locals alive


class ObservedPipelineRun:
    """The pipeline run of an observing modifier, from its calibration start to end.

    :param running: the modifiers this pipeline run calibrates
    :param observers: the modifier classes that change no weight
    """

    def __init__(self, running: list, observers: tuple[type, ...]):
        self.shortened = bool(running) and all(isinstance(m, observers) for m in running)
        self._restore: Callable[[], None] | None = None

    def skip_propagation(self) -> bool:
        """Call from ``on_calibration_start``; True if the run is now one pass per subgraph."""
        if not self.shortened:
            return False
        dataset_args = _pipeline_local("dataset_args")
        if dataset_args is None:
            logger.debug("no sequential pipeline on the call stack: two passes per subgraph kept")
            return False
        if not getattr(dataset_args, "propagate_error", True):
            return True  # already one pass: nothing to restore
        dataset_args.propagate_error = False

        def restore() -> None:
            dataset_args.propagate_error = True

        self._restore = restore
        return True

    def keep_first_samples(self, count: int) -> bool:
        """Call after the first subgraph: later subgraphs run on the first ``count`` samples only.

        :return: True if the cache was shortened (else every sample keeps running)
        """
        if not self.shortened:
            return False
        cache = _pipeline_local("activations")
        batches = getattr(cache, "batch_intermediates", None)
        if not isinstance(batches, list):
            return False
        del batches[count:]
        return True

    def restore(self) -> None:
        """Put the pipeline's setting back (call from ``on_calibration_end``); idempotent."""
        if self._restore is not None:
            self._restore()
            self._restore = None
