from lightning_mka.datamodules.calibration import CalibrationDataModule

__all__ = ["CalibrationDataModule"]
