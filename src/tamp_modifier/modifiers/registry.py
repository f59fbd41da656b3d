"""Makes our modifiers known to llm-compressor's recipe parser.

llm-compressor's ModifierFactory only discovers classes inside its own package
(no entry points), so YAML recipes can name a plugin modifier only after it is
registered. We register under the class name because that is the name the
``recipe.yaml`` saved with a model uses (``type(modifier).__name__``).
"""

from llmcompressor.modifiers import ModifierFactory

__all__ = ["register_modifiers"]


def register_modifiers(*classes) -> None:
    for cls in classes:
        ModifierFactory.register(cls.__name__, cls)
