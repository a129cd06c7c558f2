"""ssl_patch_analysis: analyse self-supervised vision models through their patch embeddings."""
from .models import SSLModel, build_backbone

__all__ = ["SSLModel", "build_backbone"]
__version__ = "0.1.0"
