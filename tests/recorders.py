"""A callback the distributed tests add with --trainer.callbacks+=recorders.BatchRecorder: every
rank writes the blocks it trained on and its local loss, per step, to a folder."""

import json
import os
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class BatchRecorder(Callback):
    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import torch

        out = self.folder / f"rank{trainer.global_rank}"
        out.mkdir(parents=True, exist_ok=True)
        step = trainer.global_step
        torch.save(batch.cpu(), out / f"batch_{step:04d}.pt")
        with open(out / "losses.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "loss": outputs["loss"].item(), "pid": os.getpid()}) + "\n")
