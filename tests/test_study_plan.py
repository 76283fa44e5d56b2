"""`nag study reproduce`: the shipped plans are valid studies, and one command runs a plan's
studies (resumable) and publishes their tables, figures and cells (a stand-in for `nag fit`: no training)."""

import json
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import REPO, TINY, nag
from nag_lightning.commands import study as study_module
from nag_lightning.commands.study_command import read_plan
from nag_lightning.errors import NagError

PLANS = sorted((REPO / "configs" / "study").glob("plan_*.yaml"))


def test_a_plan_ships_and_each_of_its_studies_is_one_its_grid_accepts(monkeypatch):
    """Each study of each shipped plan passes its grid's own checks (strategies, skip rules,
    peers, configs) up to the point where cells would run."""
    assert PLANS
    planned = []
    monkeypatch.setattr(study_module, "plan_and_run", lambda kind, arms, grid, settings, budget, reference=None:
                        planned.append((kind, [a[0] for a in arms], grid, budget, reference)))
    monkeypatch.setattr(study_module, "budget_of", lambda settings: {"tokens": settings.tokens})
    for plan in PLANS:
        studies = read_plan(plan)
        for name, (grid, options) in studies.items():
            assert all(Path(config).is_file() for config in options["config"]), (plan, name)
            grid(output=f"unused/{name}", **options)
    kinds = {kind for kind, *_ in planned}
    assert kinds == {"depth", "isoflop"}
    isoflop_arms = next(arms for kind, arms, *_ in planned if kind == "isoflop")
    # The per-token candidates for the default rule, the controls and the learned router, all at 25%.
    assert {"nag-step+per_layer@0.25", "nag-step+capacity@0.25", "nag-gate@0.25", "nag-random@0.25",
            "nag-last_layers@0.25", "router_mod@0.25"} <= set(isoflop_arms)
    # The ablations are compared with NAG, the depth study with pre-norm (its default).
    references = {"nag_no_gate" in arms: reference for kind, arms, *_, reference in planned if kind == "depth"}
    assert references == {True: "nag", False: None}


def _fake_fit(ran, best_rate=lambda cell: 3e-3, diverges_above=1.0):
    """A stand-in for a cell's `nag fit` subprocess: its result.json (its loss lowest at the cell's
    ``best_rate``), a checkpoint and an events file. (Patching ``subprocess.run`` patches it for
    everyone: other commands run as they would.)"""
    real = subprocess.run

    def run(command, *other, **options):
        if "nag_lightning.commands.main" not in command:
            return real(command, *other, **options)
        args = command[command.index("fit") + 1:]
        if "--print_config" in args:  # the configuration the cell would run: its arguments, as its config.yaml keeps them
            return SimpleNamespace(returncode=0, stdout=yaml.safe_dump(
                {"trainer": {"logger": {"init_args": {"save_dir": "ANY"}}}, "arguments": args[:-1]}))
        folder = Path(args[args.index("--trainer.logger.init_args.save_dir") + 1])
        rate = float(args[args.index("--model.init_args.learning_rate") + 1])
        seed = int(args[args.index("--seed_everything") + 1])
        if rate > diverges_above:  # as `nag fit` ends a diverged run: its error line, exit 2, no result.json
            options["stdout"].write("nag: error: training diverged at step 3: a non-finite loss (nan); ...\n")
            ran.append(folder.name)
            return SimpleNamespace(returncode=2)
        loss = 5.0 + abs(rate - best_rate(folder.name)) * 10 + 0.01 * seed + (0.1 if folder.name.startswith("nag") else 0.0)
        (folder / "result.json").write_text(json.dumps({"val_loss": loss, "test_loss": loss - 0.5, "wall_s": 1.0}))
        (folder / "config.yaml").write_text(yaml.safe_dump({"trainer": {"logger": {"init_args": {"save_dir": str(folder)}}},
                                                            "arguments": [a if a != str(folder) else "CELL" for a in args]}))
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "last.ckpt").write_bytes(b"weights")
        (folder / "events.out.tfevents.0").write_bytes(b"events")
        ran.append(folder.name)
        return SimpleNamespace(returncode=0)

    return run


def test_one_command_runs_a_plan_resumably_and_publishes_each_study_whole(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(study_module.subprocess, "run", _fake_fit(ran))
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"small": {"grid": "depth", "config": [TINY], "strategies": ["prenorm", "nag"],
                                              "depths": [1, 2], "seeds": 2, "lrs": [0.001, 0.003, 0.01]}}))
    work, results = tmp_path / "work", tmp_path / "results"
    (results / "small").mkdir(parents=True)
    (results / "small" / "stale.md").write_text("from an older study")
    code, out, err = nag("study", "reproduce", "--plan", str(plan), "--work", str(work), "--results", str(results))
    assert code == 0, err
    assert len(ran) == 2 * 2 * 3 + 2 * 2 * 1  # the sweep at seed 0, then seed 1 at the best rate
    published = results / "small"
    assert {p.name for p in published.iterdir()} >= {"study.json", "results.csv", "summary.csv", "summary.md",
                                                    "trend.csv", "val_loss_vs_depth.png", "cells"}
    assert not (published / "stale.md").exists()  # replaced whole
    cells = sorted(published.glob("cells/*"))
    assert len(cells) == len(ran) and all({p.name for p in c.iterdir()} == {"config.yaml", "result.json"} for c in cells)
    assert "| nag | 2 | 2 |" in (published / "summary.md").read_text()
    assert not list(results.glob(".*"))  # no staging or retired folder left behind

    ran.clear()  # again: every cell is finished, nothing runs, the same is published
    for extra in ([], ["--report_only"]):
        code, _, err = nag("study", "reproduce", "--plan", str(plan), "--work", str(work), "--results", str(results),
                           *extra)
        assert code == 0, err
        assert ran == [] and len(list(published.glob("cells/*"))) == len(cells)
    # A cell lost since (killed mid-run, say) runs again, and only it.
    lost = next((work / "small" / "cells").iterdir())
    (lost / "result.json").unlink()
    code, _, err = nag("study", "reproduce", "--plan", str(plan), "--work", str(work), "--results", str(results))
    assert code == 0, err
    assert ran == [lost.name]
    # A publish that stopped between its two renames left only the retired copy: it comes back.
    published.rename(results / ".small.retired")
    code, _, err = nag("study", "reproduce", "--plan", str(plan), "--work", str(work), "--results", str(results),
                       "--report_only")
    assert code == 0, err
    assert (published / "summary.md").is_file() and not list(results.glob(".*"))


def test_an_isoflop_study_resumed_with_a_sweep_per_arm_runs_only_the_new_sweep_cells(tmp_path, monkeypatch):
    ran = []  # the random control's loss is lowest at 0.01, every other arm's at 0.003
    monkeypatch.setattr(study_module.subprocess, "run", _fake_fit(ran, lambda cell: 1e-2 if "random" in cell else 3e-3))
    plan, work, results = tmp_path / "plan.yaml", tmp_path / "work", tmp_path / "results"
    entry = {"grid": "isoflop", "config": [TINY], "budget": 1e9, "rates": [0, 0.3], "skip_rule": "step",
             "skip_rules": ["random"], "seeds": 2, "lrs": [0.001, 0.003, 0.01], "lr_extensions": 0}

    def reproduce(**options):
        plan.write_text(yaml.safe_dump({"iso": {**entry, **options}}))
        code, _, err = nag("study", "reproduce", "--plan", str(plan), "--work", str(work), "--results", str(results))
        assert code == 0, err
        return {c["arm"]: c["learning_rate"] for c in json.loads((work / "iso" / "study.json").read_text())["cells"]
                if not c["sweep"]}

    # Per strategy: pre-norm and dense NAG swept, every NAG arm at dense NAG's rate.
    assert reproduce() == {"prenorm": 3e-3, "nag@0": 3e-3, "nag@0.3": 3e-3, "nag-random@0.3": 3e-3}
    assert len(ran) == 2 * 3 + 4 * 2 - 2
    ran.clear()
    # Per arm: the skipping arms' other rates run (their seed-0 cell at 0.003 is kept), and the
    # random control moves to its own best rate, reusing its seed-0 sweep cell there.
    assert reproduce(lr_per_arm=True) == {"prenorm": 3e-3, "nag@0": 3e-3, "nag@0.3": 3e-3, "nag-random@0.3": 1e-2}
    assert sorted(ran) == sorted(["nag@0.3-seed0-lr0.001", "nag@0.3-seed0-lr0.01", "nag-random@0.3-seed0-lr0.001",
                                  "nag-random@0.3-seed0-lr0.01", "nag-random@0.3-seed1-lr0.01"])
    summary = (results / "iso" / "summary.md").read_text()
    assert "swept per arm" in summary and "- nag-random@0.3: swept 0.001, 0.003, 0.01; best 0.01;" in summary


def test_a_rate_that_diverges_in_the_sweep_loses_and_the_study_goes_on(tmp_path, monkeypatch):
    ran = []  # every loss is lowest at 0.01, the top of the grid, and 0.0333 (its extension) diverges
    monkeypatch.setattr(study_module.subprocess, "run", _fake_fit(ran, lambda cell: 1e-2, diverges_above=0.02))
    plan, work, results = tmp_path / "plan.yaml", tmp_path / "work", tmp_path / "results"
    plan.write_text(yaml.safe_dump({"d": {"grid": "depth", "config": [TINY], "strategies": ["prenorm"], "depths": [1],
                                          "seeds": 2, "lrs": [0.001, 0.003, 0.01], "lr_extensions": 1}}))
    code, _, err = nag("study", "reproduce", "--plan", str(plan), "--work", str(work), "--results", str(results))
    assert code == 0, err
    (sweep,) = json.loads((work / "d" / "study.json").read_text())["learning_rate_sweeps"]
    assert sweep["rates"][-1] == pytest.approx(1 / 30) and sweep["val_losses"][-1] is None and sweep["best"] == 0.01
    diverged = json.loads((work / "d" / "cells" / "prenorm-L01-seed0-lr0.0333333" / "result.json").read_text())
    assert diverged["val_loss"] is None and "training diverged at step 3" in diverged["diverged"]
    assert len(ran) == 3 + 1 + 1  # the sweep, its diverged extension, seed 1 at 0.01
    ran.clear()  # run again: the diverged cell is a result, not repeated
    code, _, err = nag("study", "reproduce", "--plan", str(plan), "--work", str(work), "--results", str(results))
    assert code == 0 and ran == [], err


def test_a_plan_or_request_that_cannot_run_is_refused_with_what_to_change(tmp_path):
    plan = tmp_path / "plan.yaml"
    for content, expected in (
            ({"a": {"grid": "depth", "config": [TINY], "depht": [4]}}, "unknown option(s) depht; depth takes"),
            ({"a": {"grid": "sweep"}}, "needs 'grid: depth | isoflop'"),
            ([1, 2], "a plan maps study names to their options"),
            ({"a": {"grid": "depth", "config": [TINY], "seeds": "four"}}, "study 'a': "),
            ({"a": {"grid": "depth", "config": [TINY], "workers": 2}}, "unknown option(s) workers")):
        plan.write_text(yaml.safe_dump(content))
        with pytest.raises(NagError, match=re.escape(expected)):
            read_plan(plan)
    plan.write_text(yaml.safe_dump({"a": {"grid": "depth", "config": [TINY]}}))
    code, _, err = nag("study", "reproduce", "--plan", str(plan), "--work", str(tmp_path), "--only", "b")
    assert code != 0 and "b not in" in err and "it has a" in err
    code, _, err = nag("study", "reproduce", "--plan", str(plan), "--work", str(tmp_path / "w"), "--report_only")
    assert code != 0 and "holds no study past its learning-rate sweep yet" in err
    code, _, err = nag("study", "reproduce", "--plan", str(tmp_path / "none.yaml"), "--work", str(tmp_path))
    assert code != 0 and "does not exist" in err


def test_a_cell_another_study_of_the_plan_ran_the_same_is_copied_not_run_again(tmp_path, monkeypatch):
    """The ablations at 8 blocks train pre-norm and NAG exactly as the depth study does: those cells
    are copied from it (same `nag fit` arguments but the folder); a study with other settings runs its own."""
    ran = []
    monkeypatch.setattr(study_module.subprocess, "run", _fake_fit(ran))
    common = {"grid": "depth", "config": [TINY], "depths": [1], "seeds": 2, "lrs": [0.001, 0.003, 0.01]}
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({
        "depth": {**common, "strategies": ["prenorm", "nag"]},
        "ablations": {**common, "strategies": ["prenorm", "nag", "rezero"], "reference": "nag"},
        "other": {**common, "strategies": ["prenorm"], "set": ["trainer.limit_val_batches=2"]}}, sort_keys=False))
    work, results = tmp_path / "work", tmp_path / "results"
    code, out, err = nag("study", "reproduce", "--plan", str(plan), "--work", str(work), "--results", str(results))
    assert code == 0, err
    per_strategy = 3 + 1  # the sweep at seed 0 (no extension: 0.003 wins), then seed 1
    depth_runs, ablation_runs, other_runs = ran[:2 * per_strategy], ran[2 * per_strategy:3 * per_strategy], \
        ran[3 * per_strategy:]
    assert all(name.startswith("rezero") for name in ablation_runs), ran  # only the new strategy trains
    assert len(other_runs) == per_strategy and all(name.startswith("prenorm") for name in other_runs), ran
    copied = sorted(p.parent.name for p in (work / "ablations" / "cells").glob("*/reused_from.txt"))
    assert copied == sorted(depth_runs)
    assert all((work / "ablations" / "cells" / name / "checkpoints" / "last.ckpt").is_file() for name in copied)
    assert not list((work / "other" / "cells").glob("*/reused_from.txt"))
    ablations = json.loads((results / "ablations" / "study.json").read_text())
    assert len(ablations["cells"]) == 3 * per_strategy  # reported as its own cells
    assert "| prenorm | 1 | 2 |" in (results / "ablations" / "summary.md").read_text()
    # What the other study's cell must share beyond the arguments: the resolved configuration it
    # saved (a config file or default changed since) and the study's design.
    from dataclasses import fields

    from nag_lightning.commands.study import Cell, same_run_elsewhere
    recorded = next(c for c in ablations["cells"] if c["name"] == copied[0])
    cell = Cell(**{field.name: recorded[field.name] for field in fields(Cell)})
    donor = work / "depth"
    assert same_run_elsewhere(cell, ablations, [donor]) == donor / "cells" / cell.name
    config = donor / "cells" / cell.name / "config.yaml"
    saved = config.read_text()
    config.write_text(saved + "changed_since: true\n")
    assert same_run_elsewhere(cell, ablations, [donor]) is None
    config.write_text(saved)
    donor_study = json.loads((donor / "study.json").read_text())
    (donor / "study.json").write_text(json.dumps({**donor_study, "data_seed": "fixed for every seed"}))
    assert same_run_elsewhere(cell, ablations, [donor]) is None
    (donor / "study.json").write_text(json.dumps({**donor_study, "environment": {"torch": "another"}}))
    assert same_run_elsewhere(cell, ablations, [donor]) is None
