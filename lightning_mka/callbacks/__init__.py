from lightning_mka.callbacks.export import ExportCallback
from lightning_mka.callbacks.lm_eval import LMEvalCallback
from lightning_mka.callbacks.merge import MergeCallback
from lightning_mka.callbacks.progress_bar import ProgressLines
from lightning_mka.callbacks.quantize import QuantizeCallback

__all__ = ["ExportCallback", "LMEvalCallback", "MergeCallback", "ProgressLines", "QuantizeCallback"]
