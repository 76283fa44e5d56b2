"""`nag study` on tiny grids: cells are real `nag fit` runs; sweeps, resume, statistics, figures, notebooks."""

import json
import math

import pytest
import yaml

from conftest import NAG_OVERLAY, REPO, TINY, nag
from test_cli import run_notebook


@pytest.fixture(scope="module")
def depth_study(tiny_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("study") / "depth"
    args = ["study", "depth", "--output", str(folder), "--config", TINY,
            "--set", f"data.init_args.data_dir={tiny_data}", "trainer.limit_val_batches=2",
            "--strategies", "prenorm", "nag", "--depths", "1", "2", "--seeds", "1", "--lrs", "0.01",
            "--lr_extensions", "0", "--tokens", "1152", "--workers", "2"]  # no extensions: 4 cells, not 20
    code, out, err = nag(*args)
    assert code == 0, err + out
    return folder, args, out


def test_a_depth_study_sweeps_then_runs_every_cell_and_reports_statistics(depth_study):
    folder, _, printed = depth_study
    study = json.loads((folder / "study.json").read_text())
    # Every strategy swept at every depth; one rate: the sweep is the seed-0 cells, its best at the edge.
    assert [(r["strategy"], r["depth"], r["rates"], r["best"], r["at_edge"]) for r in study["learning_rate_sweeps"]] \
        == [(s, d, [0.01], 0.01, True) for s in ("prenorm", "nag") for d in (1, 2)]
    assert study["data_seed"] == "the cell's seed" and study["margin"] == 0.02
    # 1152 tokens / (4 x 32) per step: 9 steps, so the final validation is the one after training
    assert study["steps"] == 9 and study["environment"]["torch"]
    assert len(study["cells"]) == 2 * 2 and not any(c["sweep"] for c in study["cells"])
    for cell in study["cells"]:
        run = folder / "cells" / cell["name"]
        assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
        result = json.loads((run / "result.json").read_text())
        assert result["steps"] == 9 and math.isfinite(result["val_loss"]) and result["norm_growth"] > 0
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["model"]["init_args"]["config"]["n_layers"] == cell["depth"]
        assert config["seed_everything"] == cell["seed"] == config["data"]["init_args"]["seed"] == cell["data_seed"]
    summary = {(row["arm"], row["depth"]): row for row in _csv(folder / "summary.csv")}
    assert set(summary) == {("prenorm", "1"), ("prenorm", "2"), ("nag", "1"), ("nag", "2")}
    nag_row = summary[("nag", "2")]
    assert nag_row["seeds"] == "1" and nag_row["reference"] == "prenorm"
    # One seed: a difference, but no interval (the iso-FLOP test checks the intervals with two).
    assert math.isfinite(float(nag_row["diff_vs_reference"])) and math.isnan(float(nag_row["ci95_low"]))
    assert nag_row["verdict"] == "inconclusive" and math.isnan(float(nag_row["p_holm"]))  # nothing to test
    for name in ("results.csv", "summary.md", "trend.csv", "val_loss_vs_depth.png", "norm_growth_vs_depth.png"):
        assert (folder / name).stat().st_size > 0, name
    (trend,) = _csv(folder / "trend.csv")  # two points, one per depth: too few for an interval
    assert trend["arm"] == "nag" and trend["points"] == "2" and math.isnan(float(trend["slope_per_doubling"]))
    assert "| nag | 2 | 1 |" in printed and "TOST with margin ±0.02 nats" in printed
    assert "still at the edge of the sweep after 0 extension(s)" in printed and "Power: no row has two seeds" in printed
    namespace = run_notebook(REPO / "notebooks/depth_scaling.ipynb", NAG_STUDY=str(folder))
    assert set(namespace["drawn"]) == {"val_loss_vs_depth.png", "norm_growth_vs_depth.png"}


def test_a_study_resumes_without_rerunning_finished_cells_and_refuses_other_settings(depth_study):
    folder, args, _ = depth_study
    result = folder / "cells" / "nag-L02-seed0-lr0.01" / "result.json"
    before = result.stat().st_mtime_ns
    published = (folder / "study.json").read_text()
    code, out, err = nag(*args)
    assert code == 0, err
    assert "running 0 in 2 process(es)" in out and result.stat().st_mtime_ns == before
    # Nothing ran: the published study.json (its wall time included) is left as it was.
    assert (folder / "study.json").read_text() == published
    code, _, err = nag(*[a if a != "0.01" else "0.001" for a in args])
    assert code == 2 and "other settings (learning_rates)" in err


def test_an_isoflop_study_and_its_skip_sweep(tiny_data, tmp_path):
    folder = tmp_path / "isoflop"
    code, out, err = nag("study", "isoflop", "--output", str(folder), "--config", TINY, NAG_OVERLAY,
                         "--set", f"data.init_args.data_dir={tiny_data}", "trainer.limit_val_batches=2",
                         "--rates", "0.3", "--seeds", "2", "--lrs", "0.003", "0.01", "--lr_extensions", "0",
                         "--budget", "5e8", "--workers", "2")
    assert code == 0, err + out
    study = json.loads((folder / "study.json").read_text())
    assert {r["strategy"] for r in study["learning_rate_sweeps"]} == {"prenorm", "nag"}
    assert len(study["cells"]) == 6  # 4 swept, 4 main
    assert sum(c["sweep"] for c in study["cells"]) == 2  # the seed-0 cells at the losing rates
    summary = {row["arm"]: row for row in _csv(folder / "summary.csv")}
    assert set(summary) == {"prenorm", "nag@0.3"}
    nag_row = summary["nag@0.3"]
    assert nag_row["reference"] == "prenorm" and nag_row["seeds"] == "2"  # no dense NAG arm here to compare with
    assert float(nag_row["ci95_low"]) < float(nag_row["diff_vs_reference"]) < float(nag_row["ci95_high"])
    assert 0 <= float(nag_row["p_value"]) <= 1 and float(nag_row["p_holm"]) == float(nag_row["p_value"])  # m = 1
    assert 0 <= float(nag_row["tost_p"]) <= 1 and nag_row["verdict"] in ("equivalent", "different", "inconclusive")
    assert "Power: with 2 seeds per arm" in (folder / "summary.md").read_text() and not (folder / "trend.csv").exists()
    assert 0.1 < float(summary["nag@0.3"]["skip_rate_mean"]) < 0.5 and float(summary["prenorm"]["skip_rate_mean"]) == 0
    for arm in summary.values():  # both stopped at the budget, within a step
        assert 5e8 <= float(arm["executed_flops_mean"]) < 5e8 * 1.5
    assert (folder / "loss_vs_flops.png").is_file() and (folder / "skip_rate_per_layer.png").is_file()
    code, out, err = nag("study", "skip", "--output", str(folder), "--rates", "0", "0.3",
                         "--skip_rules", "step", "random", "--batches", "1")
    assert code == 0, err
    rows = _csv(folder / "skip_study.csv")
    assert {(r["skip_rule"], r["target_rate"]) for r in rows} == {(rule, rate) for rule in ("step", "random")
                                                                   for rate in ("0.0", "0.3")}
    assert len(rows) == 2 * 2 * 2  # the two NAG cells x rules x rates
    namespace = run_notebook(REPO / "notebooks/mod_isoflop.ipynb", NAG_STUDY=str(folder))
    assert "loss_vs_flops.png" in namespace["drawn"] and namespace["sweep_rows"]


def test_bad_studies_are_one_message_and_exit_code_2(tiny_data, tmp_path):
    base = ["--output", str(tmp_path / "s"), "--config", TINY, "--set", f"data.init_args.data_dir={tiny_data}"]
    old = tmp_path / "old"
    old.mkdir()
    (old / "study.json").write_text(json.dumps({"kind": "depth", "configs": [TINY], "overrides": []}))
    cases = [
        (["study", "depth", *base, "--strategies", "prenorm", "resnet"], "unknown strategies ['resnet']"),
        (["study", "depth", "--output", str(tmp_path / "s")], "give the base config(s) with --config"),
        (["study", "isoflop", *base], "--budget F"),
        (["study", "isoflop", *base, "--budget", "1e9", "--skip_rule", "norm"], "--skip_rule must be one of"),
        (["study", "skip", "--output", str(tmp_path / "nothing")], "not a study folder"),
        (["study", "depth", *base, "data.init_args.seed=3"], "each cell's seed sets data.init_args.seed"),
        (["study", "depth", *base, "--margin", "0"], "--margin positive"),
        # A folder from before seeds set the data order: its cells would mix two designs.
        (["study", "depth", "--output", str(old), *base[2:]], "use another --output for a study whose seeds"),
        # Every cell fails (an invalid model): the study stops after the sweep and names the logs.
        (["study", "depth", *base, "model.init_args.config.d_model=30", "--strategies", "prenorm", "--depths", "1",
          "--seeds", "1", "--lrs", "0.01"], "fit.log"),
    ]
    for args, message in cases:
        code, _, err = nag(*args)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)


def test_the_best_learning_rate_is_the_lowest_final_loss_and_a_diverged_cell_never_wins(tmp_path):
    from nag_lightning.commands.study import Cell, best_rate, sweep_losses

    cells = [Cell("nag", "nag", 0, lr, 4) for lr in (1e-3, 3e-3, 1e-2)]
    for cell, loss in zip(cells, (5.0, 4.5, float("nan"))):
        (tmp_path / "cells" / cell.name).mkdir(parents=True)
        (tmp_path / "cells" / cell.name / "result.json").write_text(json.dumps({"val_loss": loss}))
    losses = sweep_losses(cells, tmp_path)
    assert losses == {("nag", 4): {1e-3: 5.0, 3e-3: 4.5, 1e-2: math.inf}} and best_rate(losses["nag", 4]) == 3e-3


def _csv(path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_isoflop_arms_are_compared_with_dense_nag_and_depth_arms_with_prenorm():
    from nag_lightning.commands.study_report import reference_arm

    arms = [{"arm": "prenorm", "strategy": "prenorm", "skip_rate": 0.0},
            {"arm": "nag@0", "strategy": "nag", "skip_rate": 0.0}, {"arm": "nag@0.2", "strategy": "nag", "skip_rate": 0.2}]
    assert reference_arm({"kind": "isoflop", "arms": arms}) == "nag@0"
    assert reference_arm({"kind": "depth", "arms": arms[::-1]}) == "prenorm"
