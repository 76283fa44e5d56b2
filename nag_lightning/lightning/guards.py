"""What keeps a run honest about its result: it stops on divergence before anything non-finite is
saved, its ``last.ckpt`` is the final model, and checkpoint files are written atomically.

``LanguageModel.configure_callbacks`` adds ``DivergenceGuard`` and ``FinalCheckpoint`` to every
fit; ``NagCLI`` gives the Trainer ``AtomicCheckpointIO``.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from nag_lightning.errors import NagError
from nag_lightning.reporting import atomic_file, temporary_siblings

_NAMES_SHOWN = 5


class TrainingDiverged(NagError):
    """A non-finite loss, gradient or weight stopped training."""


def _non_finite(named: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity (one device synchronisation)."""
    if not named:
        return []
    flags = torch.stack([~torch.isfinite(t).all() for _, t in named]).tolist()
    return [name for (name, _), bad in zip(named, flags) if bad]


def _listed(names: list[str], of: int) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    more = f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else ""
    return f"{shown}{more} ({len(names)} of {of} tensors)"


class DivergenceGuard(pl.Callback):
    """Stops ``fit`` with a ``TrainingDiverged`` error (``nag: error: ...``, exit code 2) on the
    first non-finite gradient (before the optimizer applies it; not under float16 loss scaling,
    whose scaler skips such steps itself), loss or weight (after the step, before any checkpoint
    callback runs), so no checkpoint ever holds non-finite weights. Every rank takes the same
    decision. The message names the step, the last finite loss, the learning
    rate and the tensors that went non-finite."""

    def __init__(self) -> None:
        self.last_finite_loss: torch.Tensor | None = None
        self.last_finite_step: int | None = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # float16 loss scaling: an overflowing step is expected, and the scaler skips it
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        bad = bool(grads) and not torch.isfinite(torch.nn.utils.get_total_norm(grads))
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            named = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
            self._stop(trainer, "a non-finite gradient", _non_finite(named), len(named), "gradients")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        loss = None if loss is None else loss.detach()
        params = list(pl_module.named_parameters())
        weights_finite = torch.isfinite(torch.nn.utils.get_total_norm([p.detach() for _, p in params]))
        finite = weights_finite if loss is None else weights_finite & torch.isfinite(loss).all()
        if trainer.strategy.reduce_boolean_decision(not bool(finite), all=False):  # one synchronisation
            if not weights_finite:
                self._stop(trainer, "non-finite weights after the optimizer step",
                           _non_finite([(n, p.detach()) for n, p in params]), len(params), "weights")
            self._stop(trainer, f"a non-finite loss ({float(loss):g})", [], 0, "")
        if loss is not None:  # a tensor: read only when a message needs it
            self.last_finite_loss, self.last_finite_step = loss, trainer.global_step

    def _stop(self, trainer: pl.Trainer, what: str, names: list[str], of: int, kind: str) -> None:
        lrs = sorted({group["lr"] for opt in trainer.optimizers for group in opt.param_groups})
        last = ("no finite loss before it" if self.last_finite_loss is None
                else f"last finite loss {float(self.last_finite_loss):.4f} at step {self.last_finite_step}")
        where = f" Non-finite {kind}: {_listed(names, of)}." if names else ""
        saved = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
            trainer.checkpoint_callback, "best_model_path", "")
        kept = (f" The latest checkpoint, {saved}, was saved before this and is untouched: resume from it with "
                "--ckpt_path." if saved else "")
        raise TrainingDiverged(
            f"training diverged at step {trainer.global_step}: {what}; {last}; learning rate "
            f"{', '.join(f'{lr:.3g}' for lr in lrs)}.{where} Nothing non-finite was written. Lower "
            f"--model.init_args.learning_rate or keep gradient clipping on (--trainer.gradient_clip_val).{kept}")


class FinalCheckpoint(pl.Callback):
    """Saves ``last.ckpt`` at the end of ``fit`` when the last scheduled save was before the final
    step (a run of 300 steps that checkpoints every 200), so ``last.ckpt`` is the final model."""

    def __init__(self) -> None:
        self.saved_at_step: int | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.saved_at_step = trainer.global_step  # every save passes here, on every rank

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.interrupted:
            return
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint) or not callback.save_last or callback.dirpath is None:
                continue
            # Rank 0 decides for all (a save is collective; other nodes may not see its files).
            if trainer.strategy.broadcast(self.last_is_current(callback, trainer.global_step) if trainer.is_global_zero
                                          else None):
                continue
            path = os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
            trainer.save_checkpoint(path)
            callback.last_model_path = path

    def last_is_current(self, callback: ModelCheckpoint, step: int) -> bool:
        """Whether ``callback``'s last checkpoint holds step ``step``: a file says so itself; a
        sharded folder or a remote path is taken as current when some checkpoint was saved at it."""
        if not callback.last_model_path or self.saved_at_step != step:
            return False
        found = saved_step(callback.last_model_path)
        return found == step if found is not None else not os.path.isfile(callback.last_model_path)


def saved_step(path: str) -> int | None:
    """The optimizer step a checkpoint file was saved at (memory-mapped: the weights are not read);
    None for no path, a sharded checkpoint folder, a remote path or an unreadable file."""
    if not path or not os.path.isfile(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step")
    except Exception:  # a damaged file is no final checkpoint: save one
        return None


def _nearly_full(folder: Path, spare_bytes: int = 1 << 20) -> bool:
    """Whether the filesystem of ``folder`` has less than ``spare_bytes`` free."""
    try:
        return shutil.disk_usage(folder).free < spare_bytes
    except OSError:
        return False


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written like every file of this package (``reporting.atomic_file``): into
    their own folder under a temporary name, flushed to disk, then renamed over the destination: a reader sees the old file or the new one, never a partial
    one, whatever the filesystems. A failed write (a full disk) removes the temporary file, leaves
    every earlier checkpoint as it was and raises one clear error naming the folder. A temporary
    file left by a killed process is removed by the next write of the same checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options.")
        destination = Path(path)
        if "://" in str(path):  # a remote filesystem: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        destination.parent.mkdir(parents=True, exist_ok=True)
        for stale in temporary_siblings(destination):  # left by a write killed before its rename
            stale.unlink(missing_ok=True)
        full = NagError(
            f"out of disk space while saving the checkpoint {destination.name} in {destination.parent}: "
            "nothing was overwritten and the earlier checkpoints are intact. Free space there (or point "
            "--trainer.default_root_dir / the logger's save_dir elsewhere) and resume with --ckpt_path.")
        try:
            with atomic_file(destination, "wb") as file:
                try:
                    torch.save(checkpoint, file)
                except RuntimeError as error:
                    # torch's zip writer reports a short write as a RuntimeError ("unexpected pos
                    # ..."), without the errno underneath: the free space says whether the disk was
                    # full, read now, while the partial file still takes its space.
                    if _nearly_full(destination.parent):
                        raise full from error
                    raise
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise full from error
            raise
