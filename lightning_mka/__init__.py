"""lightning-mka: compress causal LLMs by merging similar transformer layers (MKA), in PyTorch Lightning."""

from lightning_mka.errors import MKAError

__version__ = "0.1.0"
__all__ = ["MKAError", "__version__"]
