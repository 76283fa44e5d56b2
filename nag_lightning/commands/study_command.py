"""``nag study``: its subcommands, and ``nag study reproduce``, which regenerates ``docs/results/``.

``depth``, ``isoflop`` and ``skip`` are the grids of ``study.py``. ``reproduce`` runs the studies a
plan file names (``configs/study/plan_cpu.yaml``) one after another into ``WORK/NAME``, each
resumable (finished cells are skipped, so invoking it again continues where it stopped; a cell
another study of the plan already ran, the same ``nag fit``, is copied from it), and then
publishes each one to ``RESULTS/NAME``: its ``summary.md``/``summary.csv``/``trend.csv`` tables,
figures, the per-cell ``results.csv``, ``study.json`` and every cell's ``config.yaml`` and
``result.json`` (checkpoints and TensorBoard events stay in WORK). A published folder is replaced
whole, through a temporary folder, so it is never half old and half new.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import yaml
from jsonargparse import ArgumentError, ArgumentParser

from nag_lightning.commands.study import depth, isoflop, skip
from nag_lightning.commands.study_report import report
from nag_lightning.commands.typed import TypedCommand
from nag_lightning.errors import NagError

PLAN_GRIDS = {"depth": depth, "isoflop": isoflop}  # the grids a plan may name
# What a study folder's reports are (``study_report.py``; skip_study.* if `nag study skip` swept it).
PUBLISHED = ("study.json", "results.csv", "summary.csv", "summary.md", "trend.csv", "rule_choice.csv", "skip_study.csv",
             "*.png")
RUN_OPTIONS = ("output", "workers", "reuse")  # where and how a study runs: the command's, not the plan's
CELL_FILES = ("config.yaml", "result.json", "reused_from.txt")


def read_plan(path: Path) -> dict[str, dict]:
    """The plan's studies, name -> (grid, the grid's options), each option checked against the
    grid's signature; config paths made relative to the plan's folder."""
    if not path.is_file():
        raise NagError(f"nag study reproduce: plan file {str(path)!r} does not exist.")
    plan = yaml.safe_load(path.read_text()) or {}
    if not isinstance(plan, dict) or not plan:
        raise NagError(f"{path}: a plan maps study names to their options, e.g. depth: {{grid: depth, ...}}.")
    studies = {}
    for name, options in plan.items():
        if not isinstance(options, dict) or options.get("grid") not in PLAN_GRIDS:
            raise NagError(f"{path}: study {name!r} needs 'grid: {' | '.join(PLAN_GRIDS)}'.")
        options = dict(options)
        grid = PLAN_GRIDS[options.pop("grid")]
        allowed = [p for p in inspect.signature(grid).parameters if p not in RUN_OPTIONS]
        unknown = [key for key in options if key not in allowed]
        if unknown:
            raise NagError(f"{path}: study {name!r} has unknown option(s) {', '.join(unknown)}; "
                           f"{grid.__name__} takes {', '.join(allowed)}.")
        parser = ArgumentParser(exit_on_error=False)
        parser.add_function_arguments(grid, as_group=False, skip=set(RUN_OPTIONS))
        try:  # typed as on the command line: 9.57e12 is a number there, though YAML 1.1 reads it as text
            parsed = parser.parse_object(options, defaults=False)
        except ArgumentError as error:
            raise NagError(f"{path}: study {name!r}: {error}") from None
        options = {key: parsed[key] for key in options}
        options["config"] = [str(path.parent / config) for config in options.get("config", [])]
        studies[name] = (grid, options)
    return studies


def publish(study: Path, destination: Path) -> None:
    """Copy the study's reports and its cells' configs and results into ``destination``, replacing it whole."""
    staging = destination.with_name(f".{destination.name}.staging")
    retired = destination.with_name(f".{destination.name}.retired")
    if retired.exists() and not destination.exists():  # an earlier publish stopped between its two renames
        retired.rename(destination)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for pattern in PUBLISHED:
        for file in study.glob(pattern):
            shutil.copy2(file, staging / file.name)
    for cell in sorted((study / "cells").glob("*/result.json")):
        (staging / "cells" / cell.parent.name).mkdir(parents=True)
        for name in CELL_FILES:
            if (cell.parent / name).is_file():
                shutil.copy2(cell.parent / name, staging / "cells" / cell.parent.name / name)
    shutil.rmtree(retired, ignore_errors=True)
    if destination.exists():
        destination.rename(retired)
    staging.rename(destination)
    shutil.rmtree(retired, ignore_errors=True)


def reproduce(plan: str, work: str, results: str = "docs/results", only: list[str] = [],  # noqa: B006
              set: list[str] = [], workers: int = 1, report_only: bool = False) -> None:  # noqa: B006
    """Run every study of a plan (resumable) and publish their tables, figures and cells to docs/results.

    Args:
        plan: the plan file: study name -> its grid (depth or isoflop) and that grid's options.
        work: where the studies run, one folder per study (WORK/NAME: checkpoints, logs, events).
        results: where each study is published (RESULTS/NAME), replacing what was there.
        only: run and publish these studies of the plan only.
        set: KEY=VALUE overrides added to every study's own, e.g. data.init_args.data_dir=DIR.
        workers: cells run in parallel processes.
        report_only: run no cell: rewrite each study's report from its finished cells and publish it.
    """
    studies = read_plan(Path(plan))
    missing = [name for name in only if name not in studies]
    if missing:
        raise NagError(f"nag study reproduce: {', '.join(missing)} not in {plan} (it has {', '.join(studies)}).")
    for name, (grid, options) in studies.items():
        if only and name not in only:
            continue
        output = Path(work) / name
        print(f"nag study reproduce: {name} ({grid.__name__}) in {output}", flush=True)
        if report_only:
            if "cells" not in (json.loads((output / "study.json").read_text()) if (output / "study.json").is_file() else {}):
                raise NagError(f"nag study reproduce: {output} holds no study past its learning-rate sweep yet; "
                               "run without --report_only first.")
            report(output)
        else:
            # A cell that another study of the plan ran already, the same fit, is copied from it.
            others = [str(Path(work) / other) for other in studies if other != name]
            grid(output=str(output), **{**options, "set": [*options.get("set", []), *set], "workers": workers,
                                        "reuse": others})
        publish(output, Path(results) / name)
        print(f"nag study reproduce: {name} published to {Path(results) / name}", flush=True)


GRIDS = {"depth": TypedCommand(depth), "isoflop": TypedCommand(isoflop), "skip": TypedCommand(skip),
         "reproduce": TypedCommand(reproduce)}


def normalise(argv: list[str]) -> list[str]:
    """``nag study``'s arguments as its subcommand parsers read them (``typed.py``)."""
    return [argv[0], *GRIDS[argv[0]].normalise(argv[1:])] if argv and argv[0] in GRIDS else argv


def add_arguments(parser) -> None:
    """``nag study``'s subcommands, each from its function's signature (see ``commands/main.py``)."""
    parser.description = "``nag study``: the paper's comparisons as grids of ordinary ``nag fit`` runs."
    subcommands = parser.add_subcommands(dest="study")
    for name, command in GRIDS.items():
        grid = ArgumentParser(prog=f"nag study {name}")
        command.add_to(grid)
        subcommands.add_subcommand(name, grid, help=command.summary)


def run(args) -> None:
    GRIDS[args.study](args[args.study])
