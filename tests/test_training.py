"""LanguageModel under a real Trainer: learning, exact resume, checkpoint round-trip, data/model checks."""

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from conftest import tiny_model_config
from nag_lightning.data import TokenShardDataModule
from nag_lightning.errors import NagError
from nag_lightning.lightning.lit_module import LanguageModel, warmup_cosine


class LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def make_trainer(max_steps, callbacks=(), root=None, **kwargs):
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=2, deterministic=True,
        gradient_clip_val=1.0, callbacks=list(callbacks), default_root_dir=root,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), **kwargs,
    )


def make_data(tiny_data, **kwargs):
    return TokenShardDataModule(str(tiny_data), context_length=32, batch_size=4, seed=3, **kwargs)


def make_model(**config):
    return LanguageModel(tiny_model_config(**config), learning_rate=3e-3, warmup_steps=2)


def test_schedule_warms_up_then_decays_to_the_floor():
    values = [warmup_cosine(s, 10, 100, 0.1) for s in range(120)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[9:], values[10:]))
    assert values[100] == pytest.approx(0.1) and values[119] == pytest.approx(0.1)


def test_weight_decay_skips_norms_and_embeddings():
    model = make_model(tie_embeddings=False)
    decay, no_decay = model.build_optimizer().param_groups
    decay_ids = {id(p) for p in decay["params"]}
    assert id(model.model.embed.weight) not in decay_ids
    assert id(model.model.head.weight) in decay_ids
    assert all(id(norm.weight) not in decay_ids for norm in model.model.residual.norms)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resume_is_exact(tiny_data, tmp_path, num_workers):
    pl.seed_everything(0)
    full = LossRecorder()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="step{step}",
                                  auto_insert_metric_name=False)
    make_trainer(8, [full, checkpoints]).fit(make_model(), datamodule=make_data(tiny_data, num_workers=num_workers))

    pl.seed_everything(123)  # the resumed run must not depend on the seed of the process
    resumed = LossRecorder()
    trainer = make_trainer(8, [resumed])
    model = make_model()
    trainer.fit(model, datamodule=make_data(tiny_data, num_workers=num_workers), ckpt_path=tmp_path / "step4.ckpt")
    assert len(full.losses) == 8 and len(resumed.losses) == 4
    assert resumed.losses == full.losses[4:]
    assert model.tokens_seen == 8 * 4 * 32


def test_training_lowers_validation_loss_and_logs_metrics(tiny_data):
    pl.seed_everything(0)
    trainer = make_trainer(200, val_check_interval=100, check_val_every_n_epoch=None, log_every_n_steps=5)
    model = make_model()
    data = make_data(tiny_data)
    before = trainer.validate(model, datamodule=data, verbose=False)[0]["val/loss"]
    trainer.fit(model, datamodule=data)
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
    assert before == pytest.approx(math.log(512), abs=0.15)
    assert metrics["val/loss"] < before - 0.75  # ln(512) = 6.24 -> ~5.3 in 200 tiny steps
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-4)
    expected_bpb = metrics["val/loss"] / math.log(2) / data.val_bytes_per_token
    assert metrics["val/bpb"] == pytest.approx(expected_bpb, rel=1e-5)
    for key in ("train/loss", "train/tokens"):  # learning rate and throughput go to the logger (test_cli)
        assert key in metrics
    assert metrics["train/tokens"] == 200 * 4 * 32


def test_checkpoint_round_trip(tiny_data, tmp_path):
    pl.seed_everything(0)
    trainer = make_trainer(3, [ModelCheckpoint(dirpath=tmp_path, filename="last")])
    model = make_model()
    trainer.fit(model, datamodule=make_data(tiny_data))
    loaded = LanguageModel.load_from_checkpoint(tmp_path / "last.ckpt")
    tokens = torch.randint(0, 512, (2, 16))
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)
    assert loaded.config.to_dict() == model.config.to_dict() and loaded.tokens_seen == model.tokens_seen
    # Plain data only, so the checkpoint's hyperparameters load without unpickling package classes.
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["hyper_parameters"]["config"]["d_model"] == 32


def test_tokenizer_larger_than_the_model_vocabulary_is_rejected(tiny_data):
    with pytest.raises(NagError, match="vocab_size"):
        make_trainer(1).fit(make_model(vocab_size=256), datamodule=make_data(tiny_data))


def test_context_longer_than_the_model_is_rejected(tiny_data):
    with pytest.raises(NagError, match="context_length"):
        make_trainer(1).fit(make_model(context_length=16), datamodule=make_data(tiny_data))


def test_a_global_batch_from_python_is_the_trainers_accumulation_checked_not_rewritten(tiny_data):
    pl.seed_everything(0)
    data = make_data(tiny_data, global_batch_size=12)
    trainer = make_trainer(2, accumulate_grad_batches=data.accumulation(ranks=1))
    model = make_model()
    trainer.fit(model, datamodule=data)
    assert trainer.accumulate_grad_batches == 3
    assert model.tokens_seen == 2 * 3 * 4 * 32  # 2 optimizer steps x 3 micro-batches x 4 blocks x 32 tokens
    plain = make_trainer(1)
    with pytest.raises(NagError, match=r"needs 3 accumulated micro-batches on 1 rank\(s\), but the Trainer accumulates 1"):
        plain.fit(make_model(), datamodule=make_data(tiny_data, global_batch_size=12))
    assert plain.accumulate_grad_batches == 1  # the data module did not touch it
    with pytest.raises(NagError, match="not divisible"):
        make_trainer(1).fit(make_model(), datamodule=make_data(tiny_data, global_batch_size=10))
