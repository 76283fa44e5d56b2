"""Lightning's progress bar, with the training rate also in tokens per second (all ranks)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar


class TokensProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` whose postfix adds ``tok/s``: the bar's own batches per second (over
    the epoch, as its it/s) times the tokens of a batch on every rank."""

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        bar = self._train_progress_bar
        tokens = getattr(pl_module, "tokens_per_batch", None)
        if bar is not None and tokens and trainer.training:
            shown = bar.format_dict
            if shown.get("elapsed") and shown.get("n"):
                metrics["tok/s"] = f"{shown['n'] / shown['elapsed'] * tokens * trainer.world_size:,.0f}"
        return metrics
