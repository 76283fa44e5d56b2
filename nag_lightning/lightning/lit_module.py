"""``LanguageModel``: the thin Lightning wrapper around the pure-PyTorch ``Transformer``."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import LearningRateMonitor, ThroughputMonitor, TQDMProgressBar
from torch import nn
from torchmetrics import MeanMetric

from nag_lightning.errors import NagError
from nag_lightning.lightning.guards import DivergenceGuard, FinalCheckpoint
from nag_lightning.lightning.progress import TokensProgressBar
from nag_lightning.model import ModelConfig, Transformer
from nag_lightning.model.inspection import inspect_model
from nag_lightning.model.parallelize import COMPILE_MODES, parallelize
from nag_lightning.model.residual.base import layer_tag
from nag_lightning.model.skip_policy import SkipRecord, SkipStats


def is_logging_step(trainer: pl.Trainer, optimizer_steps: int) -> bool:
    """Whether metrics logged after ``optimizer_steps`` optimizer steps reach the logger: Lightning's
    own rule, every ``log_every_n_steps``, and the last step."""
    return optimizer_steps % trainer.log_every_n_steps == 0 or trainer.should_stop


def warmup_cosine(step: int, warmup_steps: int, total_steps: int | None, min_lr_ratio: float,
                  progress: float | None = None) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps``
    (or, when given, at ``progress`` = 1, e.g. the fraction of a FLOP budget spent)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if progress is None:
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LanguageModel(pl.LightningModule):
    """Next-token language modelling with AdamW and warm-up + cosine decay.

    Args:
        config: the model's hyperparameters.
        learning_rate: peak learning rate.
        min_lr_ratio: the cosine schedule's floor, as a fraction of ``learning_rate``.
        warmup_steps: optimizer steps of linear warm-up.
        weight_decay: decoupled weight decay of matrices; norms, gains, biases and embeddings get none.
        special_lr_multiplier: learning-rate multiplier of the residual strategy's scalars and gates
            (NAG's alpha, beta, gate logits, w, b, g_enc, g_dec), which get no weight decay either.
            Default 0.1: trained at the matrix learning rate, NAG's gates collapsed into an "off"
            state in a public re-implementation; 1/10-1/20 of it fixed that (NAG_SPEC.md).
        betas, eps: AdamW's.
        predict_prompt_tokens, predict_new_tokens, predict_temperature: ``nag predict`` continues the
            first ``predict_prompt_tokens`` tokens of each validation block with this many sampled tokens.
        activation_checkpointing: recompute each block's activations in the backward pass instead of
            keeping them (``torch.utils.checkpoint`` per block; any strategy, checkpoints unchanged).
        compile: regional ``torch.compile`` of every block (one shared graph); with
            ``config.kernels`` it selects how the NAG update and RMSNorm run. Applied with activation
            checkpointing and FSDP2 sharding in one place, ``model/parallelize.py``.
        compile_mode: ``torch.compile``'s mode: ``default``, ``reduce-overhead`` (CUDA graphs: the
            launches of a step replayed at once; capacity-mode skipping and dense models, whose
            shapes are static), ``max-autotune`` or ``max-autotune-no-cudagraphs``.
        inspect: at every logging step, the ``inspect/*`` diagnostics (attention sinks, massive
            activations, kurtosis; ``model/inspection.py``) from one extra gradient-free forward over
            the batch's first sequence. ``false`` turns them off.
    """

    def __init__(
        self,
        config: ModelConfig | None = None,
        learning_rate: float = 3e-3,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 100,
        weight_decay: float = 0.1,
        special_lr_multiplier: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        predict_prompt_tokens: int = 32,
        predict_new_tokens: int = 64,
        predict_temperature: float = 0.8,
        activation_checkpointing: bool = False,
        compile: bool = False,
        compile_mode: str = "default",
        stop_on_divergence: bool = True,
        inspect: bool = True,
        default_callbacks: bool = True,
    ) -> None:
        super().__init__()
        if compile_mode not in COMPILE_MODES:
            raise NagError(f"LanguageModel.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}.")
        if config is None:
            config = ModelConfig()
        elif isinstance(config, dict):
            config = ModelConfig.from_dict(config)
        self.save_hyperparameters()
        if isinstance(self.hparams.get("config"), ModelConfig):
            # Plain data in checkpoints, so they load with torch.load(weights_only=True).
            self.hparams["config"] = config.to_dict()
        self.config = config
        self.model = Transformer(config)
        if not compile:  # Lightning's model summary counts the FLOPs of one sequence with it (eager only)
            self.example_input_array = torch.zeros(1, config.context_length, dtype=torch.long)
        # NaN losses are kept (the default drops them with a warning, so a partly diverged
        # validation would report a finite, biased loss).
        self.val_loss = MeanMetric(nan_strategy="disable")
        self.test_loss = MeanMetric(nan_strategy="disable")
        self.tokens_seen = 0  # all ranks, across resumes
        self.executed_flops_total = 0.0  # training FLOPs actually executed, all ranks, across resumes
        self.flops_per_batch = 0.0  # read by Lightning's ThroughputMonitor after every batch
        self._dense_flops: dict[tuple[int, int], float] = {}
        # The MoD callbacks' target (set_skip_target); top-k mode's is fixed by its capacity.
        skip = config.skip
        self.mod_target_rate = 1.0 - skip.topk_capacity if skip.mode == "topk" else 0.0
        self.schedule_progress = None  # a callable -> [0, 1] that replaces step / max_steps (set_schedule_progress)
        self.validated_at_step: int | None = None  # the global step of the latest validation
        # What the latest validation or test skipped (this rank's batches, summed); None when it skipped nothing.
        self.evaluation_skip: SkipStats | None = None
        self.training_skip: SkipStats | None = None  # what the latest training batch skipped
        self._eval_executed, self._eval_depths, self._eval_tokens = None, None, 0

    def configure_model(self) -> None:
        """Activation checkpointing, compilation and (under ModelParallelStrategy) FSDP2, once."""
        if getattr(self.model, "parallelized", False):
            return
        mesh = self.device_mesh if self._trainer is not None else None
        parallelize(self.model, activation_checkpointing=self.hparams.activation_checkpointing,
                    compile=self.hparams.compile, compile_mode=self.hparams.compile_mode,
                    data_parallel_mesh=None if mesh is None else mesh["data_parallel"])

    def begin_step(self) -> None:
        """Before each training step: with CUDA graphs, tell them a new step starts (the
        previous step's graph outputs may then be overwritten)."""
        if self.hparams.compile and self.hparams.compile_mode in ("reduce-overhead", "max-autotune"):
            torch.compiler.cudagraph_mark_step_begin()

    def set_skip_target(self, rate: float) -> None:
        """The skip rate the MoD callbacks aim at this step (logged as ``mod/target_rate``)."""
        self.mod_target_rate = float(rate)

    def set_schedule_progress(self, progress) -> None:
        """A callable -> [0, 1] that replaces ``step / max_steps`` in the learning-rate schedule
        (``IsoFlopBudget``: the share of the FLOP budget spent); None: back to steps."""
        self.schedule_progress = progress

    def configure_callbacks(self) -> list[pl.Callback]:
        """The callbacks every run of this module gets, whoever builds the Trainer (unless
        ``default_callbacks: false``, or the Trainer already has one of the same type): Lightning's
        ``ThroughputMonitor`` (tokens/s, executed FLOP/s from ``flops_per_batch``) and
        ``LearningRateMonitor``, ``TokensProgressBar`` in place of Lightning's default bar, and
        ``DivergenceGuard`` (with ``stop_on_divergence``) and ``FinalCheckpoint`` (``guards.py``)."""
        if not self.hparams.default_callbacks:
            return []
        present = {type(c) for c in self.trainer.callbacks}  # e.g. from the fit before this validate
        callbacks: list[pl.Callback] = []
        if ThroughputMonitor not in present:
            callbacks.append(ThroughputMonitor(batch_size_fn=lambda batch: batch.shape[0],
                                               length_fn=lambda batch: batch.shape[0] * (batch.shape[1] - 1),
                                               window_size=10))
        if self.trainer.loggers and LearningRateMonitor not in present:  # it refuses to run without a logger
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        if type(self.trainer.progress_bar_callback) is TQDMProgressBar:  # Lightning's default bar, not the user's
            callbacks.append(TokensProgressBar())
        if self.hparams.stop_on_divergence and DivergenceGuard not in present:
            callbacks.append(DivergenceGuard())
        if FinalCheckpoint not in present:
            callbacks.append(FinalCheckpoint())
        return callbacks

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def loss(self, batch: torch.Tensor, return_stats: bool = False, return_output: bool = False,
             calibrate: float | None = None):
        """Mean next-token cross-entropy of blocks (B, T + 1), plus the residual strategy's
        auxiliary term where its forward has one (router MoD's predictor loss: top-k training
        forwards only, so evaluation losses stay the cross-entropy alone). With ``return_stats``
        (the model's residual diagnostics) or ``return_output``: ``(loss, ForwardOutput)``, whose
        ``record`` says what the forward skipped (its ``logits`` dropped). ``calibrate``: see
        ``Transformer.forward``."""
        batch = batch.long()
        inputs, targets = batch[:, :-1], batch[:, 1:]
        details = return_stats or return_output
        # The record always (every forward builds it): the auxiliary term comes from it.
        output = self.model(inputs, return_stats=return_stats, return_record=True, calibrate=calibrate)
        loss = F.cross_entropy(output.logits.float().flatten(0, 1), targets.flatten())
        auxiliary = self.model.residual.auxiliary_loss(output.record)
        if auxiliary is not None:
            loss = loss + auxiliary
        # Without the logits: holding the (B, T, vocab) tensor through the backward would keep tens
        # of MB alive that the loss no longer needs (and page-fault them in fresh every step).
        return (loss, output._replace(logits=None)) if details else loss

    # ---- checks of the data against the model ----
    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule
        if data is None or not hasattr(data, "tokenizer_vocab_size"):
            return
        if data.tokenizer_vocab_size > self.config.vocab_size:
            raise NagError(
                f"The dataset {data.data_dir} was tokenized with a vocabulary of {data.tokenizer_vocab_size} tokens, "
                f"but the model has ModelConfig.vocab_size={self.config.vocab_size}: token ids would fall outside "
                f"the embedding. Set model.config.vocab_size >= {data.tokenizer_vocab_size}, or prepare the data "
                "with a smaller --vocab_size."
            )
        if data.context_length > self.config.context_length:
            raise NagError(
                f"data.context_length={data.context_length} is longer than the model's "
                f"ModelConfig.context_length={self.config.context_length}. Lower data.context_length or raise "
                "model.config.context_length."
            )

    # ---- training ----
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, Any]:
        # Residual diagnostics cost a little, so only on the steps whose metrics reach the logger.
        logging_step = is_logging_step(self.trainer, self.global_step + 1)  # this step's optimizer step is next
        inspect = logging_step and self.hparams.inspect and bool(self.loggers)
        inspected = inspect_model(self.model, batch[:1, :-1].long()) if inspect else {}
        loss, output = self.loss(batch, return_stats=logging_step, return_output=True)
        record = output.record
        # Counted here, not in on_train_batch_end: checkpoint callbacks run before that hook.
        batch_size, seq = batch.shape[0], batch.shape[1] - 1
        self.tokens_per_batch = batch_size * seq  # per rank; the progress bar shows tokens/s from it
        self.tokens_seen += batch_size * seq * self.trainer.world_size
        # Once per step (FLOPs and tags use it); the depth histogram only where the tags are logged,
        # and at the last step, whose statistics result.json keeps when no validation ran.
        last_step = 0 < self.trainer.max_steps <= self.global_step + 1
        self.training_skip = record.stats(depths=logging_step or last_step) if record.skipped_any else None
        executed, dense = self._step_flops(batch_size, seq, self.training_skip)
        self.flops_per_batch = 3 * executed  # training = forward + backward (2x forward)
        if record.skipped_any:
            # Summed over ranks (their skip patterns differ), so every rank holds the same total and
            # an IsoFlopBudget stops all of them at the same step.
            all_ranks = self.trainer.strategy.reduce(torch.tensor(self.flops_per_batch, dtype=torch.float64,
                                                                  device=self.device), reduce_op="sum")
            self.executed_flops_total += float(all_ranks)
        else:
            self.executed_flops_total += self.flops_per_batch * self.trainer.world_size
        if logging_step:
            stats = dict(output.stats)
            stats.update({"flops/executed_per_token": executed / (batch_size * seq),
                          "flops/dense_per_token": dense / (batch_size * seq),
                          **self.mod_stats(record, self.training_skip),
                          **inspected})
            self.log_rank_means(stats)
            self.log("flops/executed_total", self.executed_flops_total)  # already the same on every rank
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/tokens", float(self.tokens_seen))
        # The record reaches the callbacks' on_train_batch_end as outputs["skip_record"].
        return {"loss": loss, "skip_record": record}

    def log_rank_means(self, values: dict[str, torch.Tensor | float]) -> None:
        """Log the mean over ranks of many scalars with one collective (not one per tag: there are
        about 200 diagnostics at 16 blocks) and one device-to-host copy."""
        names = list(values)
        stacked = torch.stack([torch.as_tensor(values[name], dtype=torch.float32, device=self.device).reshape(())
                               for name in names])
        if self.trainer.world_size > 1:
            stacked = self.trainer.strategy.reduce(stacked, reduce_op="mean")
        self.log_dict(dict(zip(names, stacked.cpu().tolist())))

    def _step_flops(self, batch_size: int, seq: int, skipped: SkipStats | None = None) -> tuple[float, float]:
        """(executed, dense) forward FLOPs of a forward that executed ``skipped`` (``SkipRecord.stats()``
        of a skipping forward); without skipping both are the dense count, computed once per batch
        shape so the training step pays nothing for it."""
        if skipped is not None:
            executed, dense = self.model.forward_flops(batch_size, seq, skipped)
            return executed.item(), dense.item()
        if self._dense_flops.get((batch_size, seq)) is None:
            self._dense_flops[(batch_size, seq)] = self.model.forward_flops(batch_size, seq)[1].item()
        dense = self._dense_flops[(batch_size, seq)]
        return dense, dense

    def mod_stats(self, record: SkipRecord, stats: SkipStats | None = None) -> dict[str, torch.Tensor | float]:
        """Mixture-of-Depths tags of a forward's record (none for a strategy that cannot skip);
        ``stats``: its ``stats()`` where the caller has them already."""
        policy = self.model.skip_policy
        if policy is None:
            return {}
        stats = record.stats(depths=True) if stats is None else stats
        spread = stats.executed_sublayers_std
        skipped = 1.0 - stats.executed_fraction  # zeros when nothing skipped
        stats = {"mod/target_rate": float(self.mod_target_rate), "mod/skip_rate": skipped.mean()}
        if spread is not None:
            stats["mod/executed_sublayers_std"] = spread
        overflow = record.over_capacity_fraction()
        if overflow is not None:
            stats["mod/over_capacity"] = overflow
        stats.update({f"mod/skip_rate/{layer_tag(i + 1)}": rate for i, rate in enumerate(skipped)})
        thresholds = policy.thresholds
        if len(thresholds) == 1:
            stats["mod/threshold"] = thresholds[0]
        else:
            stats.update({f"mod/threshold/{layer_tag(i + 1)}": t for i, t in enumerate(thresholds)})
        return stats

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.model.residual.set_training_step(self.global_step)
        self.begin_step()

    def on_train_start(self) -> None:
        data = self.trainer.datamodule
        if data is not None and hasattr(data, "batch_size") and hasattr(data, "context_length"):
            ranks, accumulate = self.trainer.world_size, self.trainer.accumulate_grad_batches
            sequences = ranks * data.batch_size * accumulate
            self.tokens_per_optimizer_step = sequences * data.context_length
            if self.trainer.is_global_zero:
                print(f"global batch: {ranks} rank(s) x {data.batch_size} x {accumulate} accumulated = {sequences} "
                      f"sequences = {self.tokens_per_optimizer_step:,} tokens per optimizer step", flush=True)
            for logger in self.loggers:
                logger.log_hyperparams({"tokens_per_optimizer_step": self.tokens_per_optimizer_step,
                                        "world_size": ranks, "accumulate_grad_batches": accumulate})

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Right after the step, before any callback (a checkpoint) sees the weights: nGPT's
        # matrices back onto the unit sphere. (Not on_before_zero_grad, which Lightning calls
        # between the forward and the backward; not on_train_batch_end, which runs after the
        # callbacks' checkpoint.)
        if self.model.residual.normalised_weights:
            self.model.normalise_weights()

    def on_validation_start(self) -> None:
        # Re-created in this loop's grad mode: states left by an earlier `trainer.validate` are
        # inference tensors, which fit's no-grad validation may not update in place.
        self.val_loss.reset()
        self.evaluation_skip, self._eval_executed, self._eval_depths, self._eval_tokens = None, None, None, 0

    def build_optimizer(self) -> torch.optim.AdamW:
        """AdamW with decoupled weight decay on matrices only (not norms, gains, biases, embeddings)."""
        special = list(self.model.residual.optimizer_special_parameters())
        special_ids = {id(p) for p in special}
        embedding_ids = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        # Decay is for the weight matrices of linear layers only: a strategy's per-layer gains are
        # 2-D too (NAG's (2L, d) input gains) and must not be pulled towards 0.
        matrix_ids = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)} - embedding_ids
        decay, no_decay = [], []
        for param in self.parameters():  # deduplicated: a tied head is the embedding
            if param.requires_grad and id(param) not in special_ids:
                (decay if id(param) in matrix_ids else no_decay).append(param)
        lr = self.hparams.learning_rate
        # Named, so LearningRateMonitor logs train/lr/decay, train/lr/no_decay and train/lr/special.
        groups = [{"name": "decay", "params": decay, "weight_decay": self.hparams.weight_decay},
                  {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
        if special:
            groups.append({"name": "special", "params": special, "weight_decay": 0.0,
                           "lr": lr * self.hparams.special_lr_multiplier})
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(self.hparams.betas), eps=self.hparams.eps)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.build_optimizer()
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        if self.schedule_progress is None and not math.isfinite(total):
            raise NagError("The learning-rate schedule needs an end: set trainer.max_steps, or add an IsoFlopBudget "
                           "callback, which ends training and the schedule at a FLOP budget.")

        def multiplier(step: int) -> float:
            progress = None if self.schedule_progress is None else self.schedule_progress()
            return warmup_cosine(step, self.hparams.warmup_steps, total, self.hparams.min_lr_ratio, progress)

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": "train/lr"}}

    # ---- evaluation ----
    def _evaluate(self, prefix: str, batch: torch.Tensor, metric: MeanMetric) -> SkipRecord:
        batch_size, seq = batch.shape[0], batch.shape[1] - 1
        loss, output = self.loss(batch, return_output=True)
        metric.update(loss, weight=batch_size * seq)
        stats = output.record.stats(depths=True) if output.record.skipped_any else None
        self.flops_per_batch = self._step_flops(batch_size, seq, stats)[0]  # forward only
        if stats is not None:  # summed on the device; read once, at the end
            executed = stats.executed_tokens if self._eval_executed is None else self._eval_executed + stats.executed_tokens
            depths = stats.depth_histogram if self._eval_depths is None else self._eval_depths + stats.depth_histogram
            self._eval_executed, self._eval_depths = executed, depths
            self._eval_tokens += stats.tokens
        # The metric object itself: Lightning computes it over all batches and ranks at the epoch's end.
        self.log(f"{prefix}/loss", metric, on_step=False, on_epoch=True, prog_bar=prefix == "val")
        return output.record

    def _log_derived(self, prefix: str, metric: MeanMetric) -> None:
        loss = metric.compute()  # reduced over ranks by torchmetrics (and cached for the logged metric)
        self.log(f"{prefix}/ppl", loss.exp())
        data = self.trainer.datamodule
        if data is not None and hasattr(data, "val_bytes_per_token"):
            self.log(f"{prefix}/bpb", loss / math.log(2) / data.val_bytes_per_token)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, SkipRecord]:
        # The record reaches the callbacks' on_validation_batch_end as outputs["skip_record"].
        return {"skip_record": self._evaluate("val", batch, self.val_loss)}

    def on_validation_epoch_end(self) -> None:
        self._log_derived("val", self.val_loss)
        self._finish_skip_count()

    def _finish_skip_count(self) -> None:
        """What this rank's evaluation skipped, over all its batches (``evaluation_skip``)."""
        if self._eval_executed is not None:
            self.evaluation_skip = SkipStats(self._eval_executed, torch.zeros_like(self._eval_executed),
                                             self._eval_tokens, depth_histogram=self._eval_depths)
        self._eval_executed, self._eval_depths, self._eval_tokens = None, None, 0

    def on_validation_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.validated_at_step = self.global_step

    def on_test_start(self) -> None:
        self.test_loss.reset()
        self.evaluation_skip, self._eval_executed, self._eval_depths, self._eval_tokens = None, None, None, 0

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._evaluate("test", batch, self.test_loss)

    def on_test_epoch_end(self) -> None:
        self._log_derived("test", self.test_loss)
        self._finish_skip_count()

    def on_predict_start(self) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(self.trainer.datamodule.tokenizer_path))

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> list[dict[str, str]]:
        prompt = batch.long()[:, : self.hparams.predict_prompt_tokens]
        generator = torch.Generator(device=prompt.device).manual_seed(batch_idx)
        tokens = self.model.generate(prompt, self.hparams.predict_new_tokens,
                                     temperature=self.hparams.predict_temperature, top_k=50, generator=generator)
        new = tokens[:, prompt.shape[1]:]
        return [{"prompt": self._tokenizer.decode(p.tolist()), "continuation": self._tokenizer.decode(c.tolist())}
                for p, c in zip(prompt, new)]

    # ---- checkpoint extras ----
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen
        checkpoint["executed_flops_total"] = self.executed_flops_total
        if self._trainer is not None:  # so `nag skip-sweep` and friends evaluate at the run's precision
            checkpoint["precision"] = str(self.trainer.precision)
            data = self.trainer.datamodule
            tokenizer = getattr(data, "tokenizer_path", None) if data is not None else None
            if tokenizer is not None and tokenizer.is_file():
                # The tokenizer travels with the weights (~0.5 MB as JSON), so `nag generate` works
                # from a checkpoint copied away from its dataset.
                checkpoint["tokenizer"] = tokenizer.read_text(encoding="utf-8")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
        self.executed_flops_total = checkpoint.get("executed_flops_total", 0.0)
