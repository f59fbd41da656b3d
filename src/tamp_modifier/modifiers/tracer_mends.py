"""Two fixes to llm-compressor 0.14's sequential tracer, for audio-language models.

llm-compressor traces the model's top-level forward with torch.fx
(``SequentialTracer``) to cut it into one subgraph per decoder layer. Code it
cannot trace (an ``if`` on an input, say) it moves into opaque "autowrapped"
functions whose arguments are the names the code reads. Two things then go
wrong, and until now no audio model could run through any llm-compressor
pipeline:

- **A ``ModelOutput`` argument arrives as a plain ``dict``.** fx writes an
  ``OrderedDict`` subclass into the graph as a dict literal, so the wrapped
  code's attribute access fails at calibration time. Qwen2-Audio's forward reads
  ``outputs.labels`` in such a block: ``'dict' object has no attribute
  'labels'``. ``keep_model_output_classes`` rebuilds the value with its own
  class from its traced fields, the way the same tracer already rebuilds a
  ``PretrainedConfig``. A ``ModelOutput`` does everything a dict does, so code
  that read it as a dict is unaffected.
- **A wrapped block that reads ``**kwargs`` erases the whole graph.** The
  forward's ``**kwargs`` is traced as a concrete argument (always ``{}``: the
  pipeline passes only the calibration row's columns), and transformers' tracer
  then deletes every concrete argument's placeholder *with all its users*,
  assuming there are none. Qwen2.5-Omni's thinker passes ``kwargs`` into the
  wrapped audio, image and video blocks, so everything, the output included, was
  deleted: "Expected 2 subgraphs, but only traced 1" and no decoder layer ever
  calibrated. ``bake_empty_keyword_arguments`` writes the ``{}`` into those
  users before the output is recorded, which is what the traced code received.

Both are applied once, on ``import tamp_modifier``, and are idempotent.
"""

from __future__ import annotations

from typing import Any

__all__ = ["bake_empty_keyword_arguments", "keep_model_output_classes"]


def _tracer():
    from llmcompressor.pipelines.sequential.helpers import SequentialTracer

    return SequentialTracer


def keep_model_output_classes() -> None:
    """Extend ``SequentialTracer.create_arg`` so a ``ModelOutput`` stays one."""
    from transformers.utils import ModelOutput

    tracer = _tracer()
    parent = tracer.create_arg
    if getattr(parent, "_keeps_model_output_classes", False):
        return

    def create_arg(self, a: Any):
        if isinstance(a, ModelOutput):
            # Only the fields that are set: ModelOutput's constructor leaves the rest None.
            fields = {key: self.create_arg(value) for key, value in a.items()}
            return self.create_node("call_function", type(a), (), fields)
        return parent(self, a)

    create_arg._keeps_model_output_classes = True
    tracer.create_arg = create_arg


def bake_empty_keyword_arguments() -> None:
    """Extend ``SequentialTracer.create_node``: when the graph's output is recorded, every
    use of a ``**kwargs`` placeholder becomes the ``{}`` that was traced."""
    from torch.fx.node import map_arg

    tracer = _tracer()
    parent = tracer.create_node
    if getattr(parent, "_bakes_empty_keyword_arguments", False):
        return

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        if kind == "output":
            for node in self.graph.nodes:
                if node.op == "placeholder" and str(node.target).startswith("**"):
                    for user in list(node.users):
                        user.args = map_arg(user.args, lambda n, v=node: {} if n is v else n)
                        user.kwargs = map_arg(user.kwargs, lambda n, v=node: {} if n is v else n)
        return parent(self, kind, target, args, kwargs, name=name, type_expr=type_expr)

    create_node._bakes_empty_keyword_arguments = True
    tracer.create_node = create_node
