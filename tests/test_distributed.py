"""Two CPU processes (gloo) through the real CLI: DDP and FSDP2 configs, data split, equivalence, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from conftest import REPO, tiny_model_config
from nag_lightning.data import TokenShardDataModule
from nag_lightning.errors import NagError
from nag_lightning.lightning.lit_module import LanguageModel

TINY = str(REPO / "tests" / "configs" / "tiny.yaml")
DDP = str(REPO / "configs" / "strategy" / "ddp.yaml")
FSDP = str(REPO / "configs" / "strategy" / "fsdp.yaml")


def nag(*args, cwd):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "nag_lightning.commands.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def fit(tmp_path, tiny_data, *extra, steps=6, record="rec"):
    return nag("fit", "--config", TINY, *extra, "--data.init_args.data_dir", str(tiny_data),
               "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
               "--trainer.enable_progress_bar", "false",
               "--trainer.callbacks+=recorders.BatchRecorder", f"--trainer.callbacks.folder={tmp_path / record}",
               cwd=tmp_path)


def recorded(folder, rank):
    rank_dir = Path(folder) / f"rank{rank}"
    losses = [json.loads(line) for line in (rank_dir / "losses.jsonl").read_text().splitlines()]
    batches = [torch.load(p) for p in sorted(rank_dir.glob("batch_*.pt"))]
    return losses, batches


@pytest.fixture(scope="module")
def ddp_run(tiny_data, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    result = fit(tmp_path, tiny_data, "--config", DDP, "--trainer.devices", "2", steps=6)
    assert result.returncode == 0, result.stderr[-4000:]
    return tmp_path, result


def test_ddp_trains_on_two_processes_and_counts_all_ranks(ddp_run):
    tmp_path, result = ddp_run
    summary = [line for line in result.stdout.splitlines() if line.startswith("nag fit done:")]
    assert len(summary) == 1 and "tokens 1,536" in summary[0]  # 2 ranks x 6 steps x 4 x 32
    assert "2 rank(s) x 4 x 1 accumulated = 8 sequences = 256 tokens per optimizer step" in result.stdout
    pids = {json.loads(line)["pid"] for r in (0, 1) for line in (tmp_path / f"rec/rank{r}/losses.jsonl").open()}
    assert len(pids) == 2


def test_ranks_read_disjoint_data(ddp_run):
    tmp_path, _ = ddp_run
    seen = [{tuple(row.tolist()) for batch in recorded(tmp_path / "rec", rank)[1] for row in batch} for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 6 * 4
    assert not seen[0] & seen[1]


def test_two_ranks_equal_one_rank_with_the_doubled_batch(ddp_run, tmp_path):
    ddp_dir, _ = ddp_run
    (losses0, batches0), (losses1, batches1) = recorded(ddp_dir / "rec", 0), recorded(ddp_dir / "rec", 1)
    ddp_losses = [(a["loss"] + b["loss"]) / 2 for a, b in zip(losses0, losses1)]
    doubled = [torch.cat([a, b]) for a, b in zip(batches0, batches1)]

    class Replay(pl.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(doubled, batch_size=None)

    pl.seed_everything(7)  # tests/configs/tiny.yaml's seed: the same initial weights as the DDP run
    config = tiny_model_config(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2)
    model = LanguageModel(config, learning_rate=0.003, warmup_steps=5, predict_prompt_tokens=8, predict_new_tokens=8)
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    pl.Trainer(accelerator="cpu", devices=1, max_steps=6, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
               callbacks=[Record()]).fit(model, datamodule=Replay())
    assert losses == pytest.approx(ddp_losses, rel=1e-4, abs=1e-5)


def test_resume_under_ddp_is_exact(ddp_run, tiny_data, tmp_path):
    ddp_dir, _ = ddp_run
    full = [(a["loss"] + b["loss"]) / 2 for a, b in zip(*(recorded(ddp_dir / "rec", r)[0] for r in (0, 1)))]
    # A run of the same config stopped after 3 steps (its last.ckpt), then resumed to 6.
    half = fit(tmp_path, tiny_data, "--config", DDP, "--trainer.devices", "2", "--trainer.max_steps", "3",
               "--trainer.logger.init_args.version", "half", steps=3, record="half")
    assert half.returncode == 0, half.stderr[-3000:]
    ckpt = tmp_path / "runs/tiny/half/checkpoints/last.ckpt"
    resumed = nag("fit", "--config", TINY, "--config", DDP, "--trainer.devices", "2",
                  "--data.init_args.data_dir", str(tiny_data), "--trainer.max_steps", "6",
                  "--trainer.val_check_interval", "6", "--trainer.enable_progress_bar", "false",
                  "--trainer.callbacks+=recorders.BatchRecorder", f"--trainer.callbacks.folder={tmp_path / 'resumed'}",
                  "--ckpt_path", str(ckpt), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = [(a["loss"] + b["loss"]) / 2 for a, b in zip(*(recorded(tmp_path / "resumed", r)[0] for r in (0, 1)))]
    assert after == pytest.approx(full[3:], rel=1e-6)


def test_distributed_misconfiguration_is_a_clear_error(tiny_data, tmp_path, capsys):
    from nag_lightning.commands.main import main

    # Checked before anything is built, so in this process.
    for args, message in ((["--trainer.strategy", "fsdp", "--trainer.accelerator", "cpu"], "FSDP1"),
                          (["--trainer.devices", "4096"], "more devices than this machine has")):
        with pytest.raises(SystemExit) as exit_:
            main(["fit", "--config", TINY, "--data.init_args.data_dir", str(tiny_data), *args])
        assert exit_.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]
    # Known once the ranks exist, inside the launched processes: the data module's own check, here
    # for 2 ranks (a NagError, which `nag` turns into one line and exit code 2 like the ones above).
    with pytest.raises(NagError, match=r"global_batch_size=12 is not divisible by ranks x micro-batch = 2 x 4 = 8"):
        TokenShardDataModule(str(tiny_data), batch_size=4, global_batch_size=12).accumulation(ranks=2)


def test_global_batch_sets_gradient_accumulation(tiny_data, capsys):
    from nag_lightning.commands.main import main

    main(["fit", "--config", TINY, "--data.init_args.data_dir", str(tiny_data), "--trainer.logger=false",
          "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", "--trainer.max_steps", "2",
          "--trainer.enable_progress_bar", "false", "--data.init_args.global_batch_size", "16"])
    printed = capsys.readouterr().out
    assert "1 rank(s) x 4 x 4 accumulated = 16 sequences = 512 tokens per optimizer step" in printed
    assert "tokens 1,024" in printed  # 2 optimizer steps x 4 micro-batches x 4 blocks x 32 tokens


def test_mod_under_ddp_stops_every_rank_at_the_flop_budget(tiny_data, tmp_path):
    from nag_lightning.model import ModelConfig, Transformer
    from nag_lightning.model.residual import NAG

    config = yaml.safe_load(Path(TINY).read_text())["model"]["init_args"]["config"]
    model = Transformer(ModelConfig(**config, residual=NAG()))
    per_rank_step = 3 * model.forward_flops(4, 32)[1].item()
    budget = 6.5 * 2 * per_rank_step  # six and a half dense steps of both ranks
    result = nag("fit", "--config", TINY, "--config", str(REPO / "configs/residual/nag.yaml"), "--config", DDP,
                 "--trainer.devices", "2", "--data.init_args.data_dir", str(tiny_data), "--trainer.max_steps", "-1",
                 "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
                 "--trainer.callbacks+=nag_lightning.lightning.callbacks.IsoFlopBudget",
                 f"--trainer.callbacks.budget_flops={budget}",
                 "--trainer.callbacks+=nag_lightning.lightning.callbacks.SkipRateController",
                 "--trainer.callbacks.target_rate=0.3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = [line for line in result.stdout.splitlines() if line.startswith("nag fit done:")][0]
    steps = int(summary.split("steps ")[1].split()[0])
    assert steps > 7  # skipping 30% buys more than the 7 dense steps the budget allows
    assert "skip_rate" in summary


README_EXAMPLES = {  # `Scaling past one process`, as README gives them
    "ddp": ["--config", "configs/quickstart.yaml", "--config", "configs/strategy/ddp.yaml", "--trainer.devices", "2"],
    "fsdp": ["--config", "configs/quickstart.yaml", "--config", "configs/strategy/fsdp.yaml", "--trainer.devices", "2"],
    "nag-fsdp-bf16": ["--config", "configs/nag.yaml", "--config", "configs/strategy/fsdp.yaml",
                      "--config", "configs/precision/bf16-mixed.yaml"],
}


@pytest.mark.parametrize("example", sorted(README_EXAMPLES))
def test_readme_distributed_examples_run_as_written(example, tiny_data, tmp_path, capsys):
    """README's commands with a short schedule and the tiny dataset appended: the fit, its final
    validation included; for the first FSDP2 one, then the consolidation of its sharded checkpoint
    and the single-process validation exactly as README gives them, and a resume from the sharded
    checkpoint. The DDP command is only parsed here: ddp_run trains that overlay on two processes."""
    args = [str(REPO / a) if a.startswith("configs/") else a for a in README_EXAMPLES[example]]
    short = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
             "--data.init_args.data_dir", str(tiny_data), "--data.init_args.num_workers", "0",
             "--trainer.enable_progress_bar", "false"]
    if example == "ddp":
        from nag_lightning.commands.main import main

        with pytest.raises(SystemExit) as exit_:
            main(["fit", *args, *short, "--print_config"])
        config = yaml.safe_load(capsys.readouterr().out)
        assert exit_.value.code in (0, None) and config["trainer"]["strategy"]["class_path"].endswith("DDPStrategy")
        assert str(config["trainer"]["devices"]) == "2"
        return
    # The NAG example also skips, in capacity mode, under the controller: its calibration forward
    # outside the training step must hand FSDP2's gathered root parameters back to their shards.
    mod = ["--config", str(REPO / "configs/skip/capacity.yaml"),
           "--trainer.callbacks+=nag_lightning.lightning.callbacks.SkipRateController",
           "--trainer.callbacks.target_rate=0.25"] if example == "nag-fsdp-bf16" else []
    result = nag("fit", *args, *short, *mod, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "nag fit done" in result.stdout
    if mod:  # the validation after step 2 skipped under the thresholds the controller set at step 1
        summary = next(line for line in result.stdout.splitlines() if line.startswith("nag fit done:"))
        assert float(summary.split("skip_rate ")[1].split()[0]) > 0.05, summary
    if example != "fsdp":  # the consolidation, validation and resume are the same for the NAG example
        return
    run = next(tmp_path.glob("runs/*/version_0"))
    assert (run / "checkpoints/last.ckpt").is_dir()  # torch.distributed.checkpoint: one folder, a shard per rank
    convert = subprocess.run([sys.executable, "-m", "lightning.fabric.utilities.consolidate_checkpoint",
                              str(run / "checkpoints/last.ckpt"), "--output_file", "single.ckpt"],
                             cwd=tmp_path, capture_output=True, text=True)
    assert convert.returncode == 0, convert.stderr[-3000:]
    validated = nag("validate", "--config", str(run / "config.yaml"), "--ckpt_path", "single.ckpt",
                    "--trainer.devices", "1", "--trainer.strategy", "auto", cwd=tmp_path)
    assert validated.returncode == 0, validated.stderr[-3000:]
    assert "val/loss" in validated.stdout
    resumed = nag("fit", *args, *short[2:], "--trainer.max_steps", "4", "--ckpt_path", str(run / "checkpoints/last.ckpt"),
                  "--trainer.callbacks+=recorders.BatchRecorder", f"--trainer.callbacks.folder={tmp_path / 'rec'}",
                  cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert [entry["step"] for entry in recorded(tmp_path / "rec", 0)[0]] == [3, 4]  # counted on from the first 2
