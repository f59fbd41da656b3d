"""Our modifiers registered with llm-compressor as soon as, and only when, it is imported.

llm-compressor finds modifiers named in a YAML recipe only among its own classes
and those registered with its ``ModifierFactory`` (it reads no entry points), so
``import tamp_modifier`` must lead to that registration. Doing it at import
would load llm-compressor (seconds) for users who only want the parts that do not
need it (``tamp_modifier.token_pruning``, the pure ``pruning`` functions). So
``import tamp_modifier`` registers at once if llm-compressor is already loaded,
and otherwise right after llm-compressor's own package has been executed, the
first time anything imports it (``from llmcompressor import oneshot``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__all__ = ["register_with_llmcompressor"]

_HOST = "llmcompressor"
# Importing it registers the modifiers and applies the tracer mends (see its __init__).
_REGISTERING_MODULE = "tamp_modifier.modifiers"


def _register() -> None:
    # If tamp_modifier.modifiers is itself what is importing llm-compressor, this
    # returns the half-imported module, which registers when it finishes.
    importlib.import_module(_REGISTERING_MODULE)


class _RegisterAfterHostImport(importlib.abc.MetaPathFinder):
    """Finds llm-compressor as usual, then runs ``_register`` once its package has executed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _HOST:
            return None
        sys.meta_path.remove(self)  # once only; and find the real spec without us
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def execute_then_register(module):
            execute(module)
            _register()

        spec.loader.exec_module = execute_then_register
        return spec


def register_with_llmcompressor() -> None:
    """Register now if llm-compressor is loaded, else as soon as it is (idempotent)."""
    if _HOST in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterHostImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterHostImport())
