from lightning_mka.callbacks.merge import MergeCallback

__all__ = ["MergeCallback"]
