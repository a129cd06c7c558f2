"""ssl_patch_analysis: analyse self-supervised vision models through their patch embeddings.

The top-level names are imported lazily, so that ``python -m ssl_patch_analysis.<command>`` does not
import the command's own module twice.
"""
from importlib import import_module

_EXPORTS = {
    "SSLModel": "models",
    "build_backbone": "models",
    "load_dataset": "data",
    "load_model": "checkpoints",
    "save_checkpoint": "checkpoints",
    "extract_patch_embeddings": "extract",
    "PatchEmbeddings": "store",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
