"""ssl_patch_analysis: analyse self-supervised vision models through their patch embeddings."""
from .checkpoints import load_model, save_checkpoint
from .data import load_dataset
from .models import SSLModel, build_backbone

__all__ = ["SSLModel", "build_backbone", "load_dataset", "load_model", "save_checkpoint"]
__version__ = "0.1.0"
