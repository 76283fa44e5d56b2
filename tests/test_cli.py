"""The `nag` command through its real parser: every shipped YAML, print_config, bad input, bench, end to end."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_CORPUS
from nag_lightning.commands.main import main

# The entry points the README's commands name are listed whether present or not: if one went
# missing, its round-trip test below fails (a glob alone would just collect one test fewer).
ENTRY_CONFIGS = ["configs/quickstart.yaml", "configs/baseline.yaml", "configs/nag.yaml", "configs/nag_mod.yaml"]
# Study plans (configs/study/plan_*.yaml) are `nag study reproduce`'s input, not `nag fit`'s: test_study_plan.py.
SHIPPED_CONFIGS = sorted({str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")
                          if not p.name.startswith("plan_")} | set(ENTRY_CONFIGS))
TINY = str(REPO / "tests" / "configs" / "tiny.yaml")


def run_main(args, capsys):
    """(exit code, stdout, stderr) of `nag ARGS` run in this process."""
    code = 0
    try:
        main(args)
    except SystemExit as exit_:
        code = exit_.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("config", SHIPPED_CONFIGS)
def test_every_shipped_config_loads_and_round_trips(config, capsys, tmp_path):
    # Overlays (precision, strategy, kernels: no model of their own) are loaded on top of the quickstart.
    overlay = "class_path" not in (yaml.safe_load((REPO / config).read_text()).get("model") or {})
    configs = ["--config", str(REPO / "configs/quickstart.yaml")] * overlay + ["--config", str(REPO / config)]
    code, printed, err = run_main(["fit", *configs, "--print_config"], capsys)
    assert code == 0, err
    parsed = yaml.safe_load(printed)
    assert parsed["model"]["class_path"] == "nag_lightning.LanguageModel"
    assert parsed["data"]["class_path"] == "nag_lightning.TokenShardDataModule"
    dumped = tmp_path / "printed.yaml"
    dumped.write_text(printed)
    code, reprinted, err = run_main(["fit", "--config", str(dumped), "--print_config"], capsys)
    assert code == 0, err
    assert yaml.safe_load(reprinted) == parsed
    for section, values in yaml.safe_load((REPO / config).read_text()).items():
        if isinstance(values, dict) and section == "trainer":
            for key, value in values.items():
                if not isinstance(value, (dict, list)):
                    assert parsed["trainer"][key] == value, key


def test_callbacks_can_be_appended_on_the_command_line(capsys):
    code, printed, err = run_main(
        ["fit", "--config", TINY, "--trainer.callbacks+=LearningRateMonitor", "--print_config"], capsys)
    assert code == 0, err
    callbacks = [c["class_path"] for c in yaml.safe_load(printed)["trainer"]["callbacks"]]
    assert callbacks == ["lightning.pytorch.callbacks.ModelCheckpoint", "lightning.pytorch.callbacks.LearningRateMonitor"]


def test_help_lists_every_subcommand(capsys):
    code, printed, _ = run_main(["--help"], capsys)
    assert code == 0
    for name in ("fit", "validate", "test", "predict", "generate", "prepare", "bench", "skip-sweep", "study", "inspect",
                 "export", "eval"):
        assert f"  {name} " in printed, name
    for command, option in ((["prepare"], "--vocab_size"), (["bench", "train"], "--skip_rate"),
                            (["bench", "generate"], "--prompt_tokens"), (["bench", "data"], "--num_workers"),
                            (["skip-sweep"], "--rates"), (["inspect"], "--quantize"), (["export"], "--overwrite")):
        code, printed, _ = run_main([*command, "--help"], capsys)
        assert code == 0 and option in printed, command
    code, printed, _ = run_main(["bench", "--help"], capsys)
    assert code == 0 and all(mode in printed for mode in ("train", "generate", "kernels", "data", "suite"))


def test_fit_help_leads_with_this_package(capsys):
    code, printed, _ = run_main(["fit", "--help"], capsys)
    assert code == 0
    assert printed.index("--model.init_args.config") < printed.index("--trainer.accelerator")


def test_missing_dataset_names_the_prepare_command(tmp_path, capsys):
    code, _, err = run_main(["fit", "--config", TINY, "--data.init_args.data_dir", str(tmp_path / "nope"),
                             "--trainer.logger=false"], capsys)
    assert code == 2
    assert "does not exist" in err and "nag prepare --output" in err


def test_empty_corpus_is_an_error(tmp_path, capsys):
    (tmp_path / "blank.txt").write_text("\n\n")
    code, _, err = run_main(["prepare", "--output", str(tmp_path / "out"), "--corpus", str(tmp_path / "blank.txt")],
                            capsys)
    assert code == 2 and "empty" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.init_args.config.vocab_size", "300"], "vocab_size"),
        (["--data.init_args.context_length", "64"], "context_length"),
    ],
)
def test_data_that_does_not_fit_the_model_is_an_error(tiny_data, override, message, capsys):
    code, _, err = run_main(["fit", "--config", TINY, "--data.init_args.data_dir", str(tiny_data),
                             "--trainer.logger=false", *override], capsys)
    assert code == 2 and message in err and "nag: error:" in err


def test_invalid_model_config_is_an_error(capsys):
    code, _, err = run_main(["fit", "--config", TINY, "--model.init_args.config.n_heads", "3",
                             "--trainer.logger=false"], capsys)
    assert code == 2, err[-2000:]
    assert err.splitlines()[-1] == "nag: error: ModelConfig.d_model (32) must be divisible by ModelConfig.n_heads (3)."


def test_bench_prints_a_table_and_writes_json(tmp_path, capsys):
    deeper = tmp_path / "deeper.yaml"
    deeper.write_text("model:\n  init_args:\n    config:\n      n_layers: 4\n")
    out = tmp_path / "bench.json"
    code, printed, err = run_main(["bench", TINY, f"{TINY}+{deeper}", "--steps", "3", "--warmup", "1",
                                   "--json", str(out)], capsys)
    assert code == 0, err
    rows = json.loads(out.read_text())
    assert [r["config"] for r in rows] == [TINY, f"{TINY}+{deeper}"]
    for key in ("config", "params", "backend", "skip_rate", "ms_per_step_median", "tokens_per_sec", "ratio"):
        assert key in rows[0]
    assert rows[0]["ratio"] == 1.0 and rows[1]["params"] > rows[0]["params"]
    assert "ms/step" in printed and "tokens/s" in printed


def test_bench_skipping_reports_the_realized_rate(tmp_path, capsys):
    nag_tiny = f"{TINY}+{REPO / 'configs/residual/nag.yaml'}"
    out = tmp_path / "bench.json"
    code, _, err = run_main(["bench", nag_tiny, f"{nag_tiny}@0.3", "--steps", "2", "--warmup", "1", "--json", str(out)],
                            capsys)
    assert code == 0, err
    dense, sparse = json.loads(out.read_text())
    assert dense["skip_rate"] == 0.0 and abs(sparse["skip_rate"] - 0.3) < 0.1
    assert dense["peak_rss_mb"] > 0 and dense["peak_gpu_mb"] is None  # no GPU here


def test_bench_rate_curve_and_profile(tmp_path, capsys):
    nag_tiny = f"{TINY}+{REPO / 'configs/residual/nag.yaml'}"
    out = tmp_path / "bench.json"
    code, printed, err = run_main(["bench", f"{nag_tiny}@0,0.2,0.4", "--steps", "2", "--warmup", "1", "--forward",
                                   "--profile", "1", "--interleave", "--json", str(out)], capsys)
    assert code == 0, err
    rows = json.loads(out.read_text())
    assert [r["target_skip_rate"] for r in rows] == [0.0, 0.2, 0.4]
    assert rows[0]["skip_rate"] == 0.0 and rows[1]["skip_rate"] < rows[2]["skip_rate"]
    for row in rows:
        operators = [p["operator"] for p in row["profile"]]
        assert "aten::mm" in operators or "aten::addmm" in operators
        assert sum(p["share"] for p in row["profile"]) <= 1.0 + 1e-9
    assert printed.count("profile of ") == 3 and "self ms/step" in printed
    code, _, err = run_main(["bench", f"{nag_tiny}@0.2,x"], capsys)
    assert code == 2 and "rates like" in err
    code, _, err = run_main(["bench", f"{TINY}@0.3", "--steps", "1", "--warmup", "0"], capsys)
    assert code == 2 and "no gate" in err


def test_bench_suite_rows_report_the_launch_and_sync_proxies(tmp_path, capsys):
    """``nag bench --suite cpu``: rows chosen by --rows, each with MFU and the proxies a CPU can
    measure; capacity-mode skipping reads nothing on the host, threshold mode does (the packing)."""
    out = tmp_path / "suite.json"
    code, printed, err = run_main(["bench", "--suite", "cpu", "--rows", r"nag-(threshold|capacity)@0.25/torch$",
                                   "--steps", "1", "--warmup", "1", "--json", str(out)], capsys)
    assert code == 0, err
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    threshold, capacity = rows["quickstart/nag-threshold@0.25/torch"], rows["quickstart/nag-capacity@0.25/torch"]
    assert capacity["host_syncs"] == 0 and threshold["host_syncs"] >= 8  # one per skipping sub-layer at least
    assert capacity["skip_mode"] == "capacity" and 0 <= capacity["over_capacity"] < 1
    assert abs(capacity["skip_rate"] - 0.25) < 0.1 and abs(threshold["skip_rate"] - 0.25) < 0.1
    for row in rows.values():
        assert row["operators"] > 100 and 0 < row["mfu"] < 1 and row["error"] is None
    # The ratio is to dense NAG at the same shape and backend, which this selection did not run.
    assert threshold["ratio"] is None and capacity["ratio"] is None
    assert "host_syncs/step" in printed
    code, _, err = run_main(["bench", "--suite", "cpu", "--rows", "nothing-matches"], capsys)
    assert code == 2 and "matches no row" in err
    code, _, err = run_main(["bench", "--rows", "nag"], capsys)  # --rows is the suite's: train refuses it
    assert code == 2 and "unrecognized arguments: --rows" in err and "nag bench train --help" in err
    code, _, err = run_main(["bench", "--kernels", "--suite", "cpu"], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("nag: error: nag bench: --kernels and --suite are two modes")


def test_a_value_of_the_wrong_type_names_the_key_the_type_and_the_value(capsys, tmp_path):
    overlay = tmp_path / "eight.yaml"
    overlay.write_text('model:\n  init_args:\n    config:\n      n_layers: "eight"\n')
    code, _, err = run_main(["fit", "--config", TINY, "--config", str(overlay)], capsys)
    assert code == 2
    assert ("nag: error: nag_lightning.model.ModelConfig.n_layers needs a value of type int, got 'eight'"
            in err.strip().splitlines()[0]), err[:2000]


def test_a_setting_lightning_refuses_is_one_line(tiny_data, capsys, tmp_path):
    overlay = tmp_path / "top_k.yaml"
    overlay.write_text("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                       "      init_args:\n        save_top_k: 3\n")
    code, _, err = run_main(["fit", "--config", TINY, "--config", str(overlay), "--data.init_args.data_dir",
                             str(tiny_data)], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("nag: error: ModelCheckpoint(save_top_k=3, monitor=None) is not a "
                                                   "valid configuration"), err[-2000:]
    assert "Traceback" not in err


def test_a_fit_refused_before_its_first_step_leaves_no_run_folder(tiny_data, capsys, tmp_path):
    runs = tmp_path / "refused"
    for version in ("", "version_0"):  # a named folder of its own, and Lightning's version_N
        code, _, err = run_main(["fit", "--config", TINY, "--data.init_args.data_dir", str(tiny_data),
                                 "--trainer.logger.init_args.save_dir", str(runs),
                                 "--trainer.logger.init_args.name", "isoflop/dense",
                                 f"--trainer.logger.init_args.version={version}", "--trainer.max_steps", "-1",
                                 "--trainer.callbacks+=nag_lightning.lightning.callbacks.IsoFlopBudget",
                                 "--trainer.callbacks.budget_flops=1", "--trainer.enable_progress_bar=false"], capsys)
        assert code == 2 and "smaller than one dense optimizer step" in err, err[-2000:]
        assert not [p for p in runs.rglob("*") if p.is_file()], version


def nag(*args, cwd):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "nag_lightning.commands.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_bad_input_is_one_message_and_exit_code_2(tmp_path):
    result = nag("fit", "--config", TINY, "--data.init_args.data_dir", "missing", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("nag: error: Dataset folder missing does not exist.")
    assert "Traceback" not in result.stderr


def run_notebook(path, **env):
    """Execute a notebook's code cells in order, as a reader would, with a non-interactive backend."""
    import matplotlib

    matplotlib.use("Agg")
    cells = json.loads(path.read_text())["cells"]
    namespace = {}
    old_env = dict(os.environ)
    os.environ.update(env)
    try:
        for cell in cells:
            if cell["cell_type"] == "code":
                exec(compile("".join(cell["source"]), f"{path.name}", "exec"), namespace)
    finally:
        os.environ.clear()
        os.environ.update(old_env)
    return namespace


def test_prepare_fit_validate_predict_end_to_end(tmp_path):
    prepared = nag("prepare", "--output", "data/tiny", "--corpus", *TINY_CORPUS, "--vocab_size", "512", cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    assert json.loads((tmp_path / "data/tiny/meta.json").read_text())["vocab_size"] == 512

    fit = nag("fit", "--config", TINY, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    summary = [line for line in fit.stdout.splitlines() if line.startswith("nag fit done:")]
    assert len(summary) == 1
    assert "val_loss" in summary[0] and "val_bpb" in summary[0] and "tokens 2,560" in summary[0]
    run = tmp_path / "runs/tiny/version_0"
    assert f"run {Path('runs/tiny/version_0')}" in summary[0]
    assert list(run.glob("events.out.tfevents.*")) and (run / "config.yaml").is_file()
    assert (run / "checkpoints/last.ckpt").is_file()
    result = json.loads((run / "result.json").read_text())  # what `nag study` reads
    assert f"val_loss {result['val_loss']:.4f}" in summary[0] and result["steps"] == 20 and result["tokens"] == 2560
    assert result["norm_growth"] > 0 and result["executed_flops"] > 0 and result["skip_rate"] == 0.0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run)).Reload()
    for tag in ("train/loss", "train/lr/decay", "train/lr/no_decay", "train/tokens", "train/device/items_per_sec",
                "train/device/flops_per_sec", "val/loss", "val/ppl", "val/bpb",
                "residual/rms/layer_01", "residual/relative_update/layer_04", "residual/rotation_deg/layer_02",
                "residual/norm_growth"):
        assert tag in events.Tags()["scalars"], tag
    assert [e.step for e in events.Scalars("residual/norm_growth")] == [4, 9, 14, 19]  # every log_every_n_steps

    run_notebook(REPO / "notebooks/inspect_run.ipynb", NAG_RUN=str(run))

    config_before = (run / "config.yaml").read_text()
    validated = nag("validate", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints/last.ckpt"),
                    cwd=tmp_path)
    assert validated.returncode == 0, validated.stderr[-3000:]
    assert "val/bpb" in validated.stdout
    # Into the run's own folder: no new version_N, its config.yaml untouched, no checkpoint-folder warning.
    assert sorted(p.name for p in (tmp_path / "runs/tiny").iterdir()) == ["version_0"]
    assert (run / "config.yaml").read_text() == config_before
    assert "dirpath has changed" not in validated.stderr
    for noise in ("litlogger", "is not supported by the model summary"):
        assert noise not in fit.stderr + fit.stdout + validated.stderr, noise

    predicted = nag("predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints/last.ckpt"),
                    "--trainer.logger=false", "--trainer.limit_predict_batches=0.05", cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    samples = predicted.stdout.count("--- continuation ---")
    assert samples >= 4 and samples % 4 == 0  # whole batches of 4 prompts, a few batches only


def fit_tiny_nag(tiny_data, save_dir, capsys, steps):
    """`nag fit` of the tiny config with the NAG strategy, in this process; its printed output."""
    code, printed, err = run_main(
        ["fit", "--config", TINY, "--config", str(REPO / "configs/residual/nag.yaml"),
         "--data.init_args.data_dir", str(tiny_data), "--trainer.logger.init_args.save_dir", str(save_dir),
         "--trainer.max_steps", str(steps), "--trainer.enable_progress_bar", "false"], capsys)
    assert code == 0, err
    return printed


def test_nag_trains_through_the_cli_and_logs_its_diagnostics(tiny_data, tmp_path, capsys):
    printed = fit_tiny_nag(tiny_data, tmp_path, capsys, steps=15)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(tmp_path / "nag" / "version_0")).Reload().Tags()["scalars"]
    for layer in ("01", "04"):
        for tag in ("nag/gate", "nag/step", "nag/alpha", "residual/rms", "mod/skip_rate"):
            assert f"{tag}/layer_{layer}" in tags
    for tag in ("flops/executed_per_token", "flops/dense_per_token", "flops/executed_total", "mod/target_rate",
                "mod/skip_rate", "mod/threshold", "train/device/flops_per_sec", "train/lr/special"):
        assert tag in tags, tag
    assert "train/device/mfu" not in tags  # a CPU's peak FLOP/s is unknown: no MFU rather than a guess
    assert "nag fit done:" in printed


def test_skip_sweep_writes_a_table_csv_and_plot(tiny_data, tmp_path, capsys):
    import csv

    fit_tiny_nag(tiny_data, tmp_path, capsys, steps=20)
    ckpt = tmp_path / "nag/version_0/checkpoints/last.ckpt"
    code, printed, err = run_main(["skip-sweep", "--ckpt_path", str(ckpt), "--rates", "0", "0.2", "0.4", "0.6"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "nag/version_0/checkpoints/last.skip_sweep.csv")))
    assert [float(r["target_rate"]) for r in rows] == [0.0, 0.2, 0.4, 0.6]
    flops = [float(r["forward_flops_per_token"]) for r in rows]
    # Executed FLOPs count what ran: at 128 tokens a packing pads to 64-row buckets and the CPU's
    # masked attention computes a whole box, so between skipping rates they need not fall.
    assert all(skipping < flops[0] for skipping in flops[1:]) and flops[-1] < flops[1]
    for row in rows:
        assert abs(float(row["realized_rate"]) - float(row["target_rate"])) < 0.1
    assert (tmp_path / "nag/version_0/checkpoints/last.skip_sweep.png").stat().st_size > 0
    assert "fwd MFLOP/token" in printed


def test_skip_sweep_rejects_bad_rates_and_gateless_checkpoints(capsys):
    code, _, err = run_main(["skip-sweep", "--ckpt_path", "x.ckpt", "--rates", "0.2", "1.0"], capsys)
    assert code == 2 and "--rates must lie in [0, 1)" in err
    code, _, err = run_main(["skip-sweep", "--ckpt_path", "missing.ckpt"], capsys)
    assert code == 2 and "does not exist" in err


# The first strategies; every other overlay (the baselines, the NAG ablations) is loaded through the
# CLI by test_every_shipped_config_loads_and_round_trips and trains in test_strategies (suite time).
CLI_TRAINED = ["prenorm", "postnorm", "layernorm_scaling", "orthogonal", "nag"]


@pytest.mark.parametrize("strategy", CLI_TRAINED)
def test_every_residual_strategy_trains_through_the_cli(strategy, tiny_data, capsys):
    code, printed, err = run_main(
        ["fit", "--config", TINY, "--config", str(REPO / f"configs/residual/{strategy}.yaml"),
         "--data.init_args.data_dir", str(tiny_data), "--trainer.logger=false", "--trainer.callbacks=[]",
         "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false", "--trainer.max_steps=12",
         "--trainer.limit_val_batches=2"], capsys)
    assert code == 0, err
    val_loss = float(printed.split("val_loss ")[1].split()[0])
    assert val_loss < math.log(512)  # it learned something in 12 steps


@pytest.mark.parametrize("old, new", [
    (["bench", "--steps", "3", "A.yaml"], ["bench", "train", "A.yaml", "--steps", "3"]),
    (["bench", "--forward", "A.yaml", "B.yaml@0,0.1"], ["bench", "train", "--configs", '["A.yaml", "B.yaml@0,0.1"]', "--forward"]),
    (["bench", "--interleave", "--generate", "A", "B"], ["bench", "generate", "A", "B", "--interleave"]),
    (["bench", "--suite=gpu", "--rows", "x"], ["bench", "suite", "gpu", "--rows", "x"]),
    (["bench", "--data", "d1", "d2", "--steps", "5"], ["bench", "data", "d1", "d2", "--steps", "5"]),
    (["skip-sweep", "--ckpt_path", "c", "--rates", "0", "0.2"], ["skip-sweep", "--ckpt_path", "c", "--rates", "[0,0.2]"]),
    (["skip-sweep", "--ckpt_path", "c", "--rates=0.2"], ["skip-sweep", "--ckpt_path", "c", "--rates", "0.2"]),
    (["generate", "--ckpt_path", "c", "--prompt", "[INST] hi", "-"], ["generate", "--ckpt_path", "c", "--prompt=[INST] hi", "--prompt+", "-"]),
    (["inspect", "--ckpt_path", "c", "--quantize_activations", "true"], ["inspect", "--ckpt_path", "c", "--quantize_activations"]),
    (["eval", "--ckpt_path", "c", "--tasks", "a", "b"], ["eval", "--ckpt_path", "c", "--tasks", '["a", "b"]']),
])
def test_the_forms_users_have_typed_parse_as_the_typed_ones(old, new):
    from nag_lightning.commands.main import build_parser

    parser = build_parser()
    assert parser.parse_args(old) == parser.parse_args(new)


def test_a_list_option_without_values_is_one_line(capsys):
    code, _, err = run_main(["generate", "--ckpt_path", "c", "--prompt"], capsys)
    assert code == 2 and err.strip() == "nag: error: --prompt needs at least one value, e.g. --prompt A B."
