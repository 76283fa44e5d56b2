from nag_lightning.data.datamodule import TokenShardDataModule
from nag_lightning.data.preparation import PrepareSettings, prepare, read_meta

__all__ = ["PrepareSettings", "TokenShardDataModule", "prepare", "read_meta"]
