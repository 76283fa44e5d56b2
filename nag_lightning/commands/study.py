"""``nag study``: the paper's comparisons as grids of ordinary ``nag fit`` runs.

- ``nag study depth``: residual strategies × depths × seeds, at a token or FLOP budget;
- ``nag study isoflop``: NAG at several skip rates (one skip rule) and pre-norm, at one FLOP budget;
- ``nag study skip``: ``skip-sweep`` of a study's NAG checkpoints under several skip rules
(``study_command.py`` wires them as subcommands, beside ``nag study reproduce``).

Fair by construction: each strategy gets a learning-rate sweep at every grid point (every depth,
or the budget; seed 0), extended one step beyond an edge of the swept rates while the best rate
lies there (``next_learning_rates``), and then runs at its best rate there. A cell's seed sets both
the initialisation (``--seed_everything``) and the data order (``--data.init_args.seed``). Each
cell holds the last ``TEST_FRACTION`` of the validation split out as its test split: rates are
chosen on validation, and the report compares test losses.
Every cell is a ``nag fit`` in its own folder (``DIR/cells/NAME``: its resolved ``config.yaml``,
TensorBoard events, checkpoints, ``result.json``, ``fit.log``); a cell with a ``result.json`` is
finished and skipped when the study runs again, so a study resumes where it stopped. Cells run
in ``--workers`` processes.
``study_report.py`` aggregates the cells into tables and figures.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from nag_lightning.commands.runs import instantiate
from nag_lightning.commands.study_report import MARGIN, report, skip_study, split_skip_rule
from nag_lightning.errors import NagError
from nag_lightning.model.residual import BY_NAME
from nag_lightning.model.skip_policy import SKIP_RULES
from nag_lightning.reporting import write_atomically

# Strategy names a study accepts: the overlay names of configs/residual/ (the residual package's registry).
STRATEGIES = {name: strategy.__name__ for name, strategy in BY_NAME.items()}
# Peers that skip by a learned router (top-k in training; skip.mode "topk"), not by NAG's thresholds.
LEARNED_ROUTERS = ("router_mod",)
# A skip rule of an isoflop arm may name how it is applied as well: RULE+per_layer (one threshold
# per sub-layer instead of one global one), RULE+capacity (capacity mode's static per-sequence
# capacities), or both. Each modifier is the SkipConfig setting it stands for.
SKIP_MODIFIERS = {"per_layer": ("threshold_scope", "per_layer"), "capacity": ("mode", "capacity")}
LR_STEP = 3.0  # how far a one-rate sweep steps beyond its rate (a longer --lrs gives its own ratio)
# study.json's mark that its cells' seeds set the data order too; a folder without it mixes designs.
DATA_SEED = "the cell's seed"
# The share of the validation split's blocks each cell holds out as its test split: learning rates
# are chosen on the rest, every reported number comes from it (study_report.reported_metric).
TEST_FRACTION = 0.5


def split_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    """``--set KEY=VALUE`` items as (key, value)."""
    return [tuple(override.split("=", 1)) for override in overrides]


@dataclass(frozen=True)
class Cell:
    """One ``nag fit`` of a study."""

    arm: str  # what the study compares: a strategy, or a strategy at a skip rate ("nag@0.25")
    strategy: str
    seed: int
    learning_rate: float
    depth: int | None = None  # blocks; None: the base config's
    skip_rate: float = 0.0
    skip_rule: str | None = None

    @property
    def name(self) -> str:
        depth = "" if self.depth is None else f"-L{self.depth:02d}"
        return f"{self.arm}{depth}-seed{self.seed}-lr{self.learning_rate:g}"

    @property
    def data_seed(self) -> int:
        """The data module's shuffling seed: seeds then vary the data order as well as the
        initialisation, so the spread over seeds covers both."""
        return self.seed

    def fit_arguments(self, study: dict, folder: Path) -> list[str]:
        args = ["fit"]
        for config in study["configs"]:
            args += ["--config", config]
        args += ["--model.init_args.config.residual", f"nag_lightning.model.residual.{STRATEGIES[self.strategy]}",
                 "--seed_everything", str(self.seed), "--data.init_args.seed", str(self.data_seed),
                 "--data.init_args.test_fraction", str(study.get("test_fraction", 0.0)),
                 "--model.init_args.learning_rate", str(self.learning_rate),
                 "--trainer.logger", "nag_lightning.lightning.dashboard.TensorBoardLogger",
                 "--trainer.logger.init_args.save_dir", str(folder), "--trainer.logger.init_args.name", "",
                 "--trainer.logger.init_args.version", "", "--trainer.enable_progress_bar", "false"]
        if self.depth is not None:
            args += ["--model.init_args.config.n_layers", str(self.depth)]
        if self.skip_rule is not None:
            rule, modifiers = split_skip_rule(self.skip_rule)
            args += ["--model.init_args.config.skip.rule", rule]
            for field, value in map(SKIP_MODIFIERS.get, modifiers):
                args += [f"--model.init_args.config.skip.{field}", value]
        if study.get("flops"):
            args += ["--trainer.max_steps", "-1", "--trainer.callbacks+=nag_lightning.lightning.callbacks.IsoFlopBudget",
                     f"--trainer.callbacks.budget_flops={study['flops']}"]
        elif study.get("steps"):
            args += ["--trainer.max_steps", str(study["steps"])]
        if self.strategy in LEARNED_ROUTERS:  # a fixed top-k share in training, the predictor in evaluation
            args += ["--model.init_args.config.skip.mode", "topk",
                     "--model.init_args.config.skip.topk_capacity", f"{1.0 - self.skip_rate:g}"]
        elif self.skip_rate > 0:
            args += ["--trainer.callbacks+=nag_lightning.lightning.callbacks.SkipRateController",
                     f"--trainer.callbacks.target_rate={self.skip_rate}"]
        for key, value in split_overrides(study.get("overrides", [])):
            args += ["--" + key, value]
        return args


def resolved_config(arguments: list[str]) -> dict:
    """The configuration ``nag ARGUMENTS`` resolves to (``--print_config``), as a cell's
    ``config.yaml`` records it, without the folder it logs to."""
    import yaml

    printed = subprocess.run([sys.executable, "-m", "nag_lightning.commands.main", *arguments, "--print_config"],
                             capture_output=True, text=True)
    return without_log_folder(yaml.safe_load(printed.stdout) if printed.returncode == 0 else None)


def without_log_folder(config: dict | None) -> dict | None:
    logger = ((config or {}).get("trainer") or {}).get("logger")
    if isinstance(logger, dict) and isinstance(logger.get("init_args"), dict):
        logger["init_args"].pop("save_dir", None)
    return config


def same_run_elsewhere(cell: Cell, study: dict, studies: list[Path]) -> Path | None:
    """A finished cell of one of ``studies`` (folders) that ran this cell's ``nag fit``; None if
    none did. The same fit: the same cell and arguments (its folder aside), a study of the same
    design and environment (``DATA_SEED``, versions, machine), and the same resolved configuration
    (``--print_config`` against the ``config.yaml`` it saved), so a config file or a default
    changed since does not pass. A study lists its cells in ``study.json`` once they have all run."""
    import yaml

    mine = cell.fit_arguments(study, Path("CELL"))
    for other in studies:
        folder = Path(other) / "cells" / cell.name
        if not (folder / "result.json").is_file() or not (Path(other) / "study.json").is_file():
            continue
        other_study = json.loads((Path(other) / "study.json").read_text())
        recorded = next((c for c in other_study.get("cells", []) if c.get("name") == cell.name), None)
        if recorded is None or other_study.get("data_seed") != DATA_SEED or (
                other_study.get("environment") != study.get("environment")):
            continue
        try:
            theirs = Cell(**{field.name: recorded[field.name] for field in fields(Cell)})
        except KeyError:
            continue
        if theirs != cell or theirs.fit_arguments(other_study, Path("CELL")) != mine:
            continue
        saved = without_log_folder(yaml.safe_load((folder / "config.yaml").read_text())) \
            if (folder / "config.yaml").is_file() else None
        if saved is not None and saved == resolved_config(mine):
            return folder
    return None


def run_cells(cells: list[Cell], study: dict, output: Path, workers: int, log=print,
              reuse: list[str] = ()) -> list[Cell]:
    """Run the unfinished cells, ``workers`` at a time; return the cells that failed. A cell that
    one of the ``reuse`` study folders already ran, the same ``nag fit`` (``same_run_elsewhere``),
    is copied from there instead."""
    pending = [cell for cell in dict.fromkeys(cells) if not (output / "cells" / cell.name / "result.json").is_file()]
    for leftover in (output / "cells").glob(".*.copying"):  # a copy an earlier run did not finish
        shutil.rmtree(leftover, ignore_errors=True)
    copied = []
    for cell in pending:
        source = same_run_elsewhere(cell, study, [Path(r) for r in reuse])
        if source is not None:
            destination = output / "cells" / cell.name
            shutil.rmtree(destination, ignore_errors=True)
            staging = destination.with_name(f".{cell.name}.copying")  # never a half-copied "finished" cell
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(source, staging)
            (staging / "reused_from.txt").write_text(f"{source}\n")
            staging.rename(destination)
            copied.append(cell)
    if copied:
        log(f"nag study: {len(copied)} cell(s) copied from another study that ran the same nag fit: "
            + ", ".join(cell.name for cell in copied))
        pending = [cell for cell in pending if cell not in copied]
    log(f"nag study: {len(cells) - len(pending)} of {len(cells)} cells already finished; running {len(pending)} "
        f"in {workers} process(es)")
    threads = str(max(1, (os.cpu_count() or 1) // workers))

    def run(cell: Cell) -> Cell | None:
        folder = output / "cells" / cell.name
        shutil.rmtree(folder, ignore_errors=True)  # an unfinished cell starts over
        folder.mkdir(parents=True)
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        with open(folder / "fit.log", "w") as out:
            code = subprocess.run([sys.executable, "-m", "nag_lightning.commands.main", *cell.fit_arguments(study, folder)],
                                  stdout=out, stderr=subprocess.STDOUT, env=env).returncode
        done = code == 0 and (folder / "result.json").is_file()
        status = "done" if done else ("diverged" if divergence(folder) else "FAILED") + \
            f" (exit {code}), see {folder / 'fit.log'}"
        log(f"nag study: {cell.name}: {status}")
        return None if done else cell

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [cell for cell in pool.map(run, pending) if cell is not None]


DIVERGED = "training diverged at step"  # how `nag fit` ends a diverged run (lightning/guards.py)


def divergence(folder: Path) -> str | None:
    """The line with which a cell's ``nag fit`` stopped for divergence, if it did."""
    log = folder / "fit.log"
    lines = log.read_text(errors="replace").splitlines()[-5:] if log.is_file() else []
    return next((line for line in lines if DIVERGED in line), None)


def record_divergence(output: Path, cell: Cell) -> bool:
    """Whether a sweep cell that failed ended because training diverged: that is its result (a
    rate too high, which never wins), so it is recorded as a finished cell without a loss, and a
    study run again does not repeat it. Any other failure is left to stop the study."""
    folder = output / "cells" / cell.name
    reason = divergence(folder)
    if reason is None:
        return False
    write_atomically(folder / "result.json", json.dumps({"val_loss": None, "diverged": reason.strip()}, indent=2))
    return True


def finished_cells(output: Path) -> set[str]:
    return {path.parent.name for path in (output / "cells").glob("*/result.json")}


def read_result(output: Path, cell: Cell) -> dict | None:
    path = output / "cells" / cell.name / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def sweep_losses(cells: list[Cell], output: Path) -> dict[tuple[str, int | None], dict[float, float]]:
    """Per (arm, grid point), each swept rate's final validation loss; a diverged or unfinished
    cell's is infinite, so it never wins."""
    losses: dict[tuple[str, int | None], dict[float, float]] = {}
    for cell in cells:
        result = read_result(output, cell)
        loss = result["val_loss"] if result and result["val_loss"] is not None else math.inf
        losses.setdefault((cell.arm, cell.depth), {})[cell.learning_rate] = math.inf if math.isnan(loss) else loss
    return losses


def best_rate(losses: dict[float, float]) -> float:
    """The rate with the lowest loss; on a tie the smallest (the safer one)."""
    return min(sorted(losses), key=lambda lr: losses[lr])


def _rounded(rate: float) -> float:
    # Six significant digits, as a cell's name writes its rate: 0.01 * 3 is 0.03, not 0.030000000000000002.
    return float(f"{rate:.6g}")


def next_learning_rates(losses: dict[float, float]) -> list[float]:
    """The rates to sweep next, given the swept rates and their final validation losses: one step
    beyond the edge where the best rate lies (the ratio of the edge rate to its neighbour; a single
    rate is the edge on both sides and steps by ``LR_STEP`` both ways), or none when the best lies inside."""
    rates = sorted(losses)
    best = best_rate(losses)
    if len(rates) == 1:
        beyond = [best / LR_STEP, best * LR_STEP]
    elif best == rates[0]:
        beyond = [rates[0] * rates[0] / rates[1]]
    elif best == rates[-1]:
        beyond = [rates[-1] * rates[-1] / rates[-2]]
    else:
        beyond = []
    return [rate for rate in map(_rounded, beyond) if rate not in losses]


def environment() -> dict:
    """Where a study ran: versions, processor, cores and GPU."""
    import platform

    import lightning
    import torch

    processor = platform.processor()
    try:
        processor = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "processor": processor, "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


@dataclass
class StudySettings:
    """What every grid shares (``_COMMON_DOC``), and a depth study's training budget."""

    output: str
    config: list[str]
    set: list[str]  # KEY=VALUE overrides for every cell
    seeds: int
    lrs: list[float]
    workers: int
    tokens: int | None = None
    flops: float | None = None
    margin: float = MARGIN  # equivalence margin, nats of validation loss (the report's TOST)
    lr_extensions: int = 3  # steps a sweep may extend beyond an edge of its rates
    reuse: list[str] = ()  # other study folders whose finished cells are copied where they ran the same fit
    lr_per_arm: bool = False  # sweep every arm (each skip rule, each rate), not only each strategy's first


def check_resumable(output: Path, study: dict) -> dict:
    """Refuse a folder whose cells were planned otherwise: mixing them would skew every comparison.
    Return the folder's earlier ``study.json`` ({} for a new study)."""
    path = output / "study.json"
    if not path.is_file():
        return {}
    before = json.loads(path.read_text())
    if before.get("data_seed") != DATA_SEED:
        raise NagError(f"{output} holds a study whose cells kept the config's data order for every seed; "
                       "use another --output for a study whose seeds vary the data order too.")
    differing = [key for key in ("kind", "configs", "overrides", "learning_rates", "steps", "flops", "test_fraction")
                 if before.get(key) != study.get(key)]
    if differing:
        raise NagError(f"{output} holds a study with other settings ({', '.join(differing)}); "
                       "use another --output or the same settings to resume it.")
    return before


SweepArm = tuple[str, str, float, "str | None"]  # (arm, strategy, skip rate, skip rule)


def sweep_learning_rates(sweep_arms: list[SweepArm], grid: list[int | None], args: StudySettings, study: dict,
                         output: Path) -> tuple[list[Cell], list[dict]]:
    """Sweep ``args.lrs`` for every sweep arm at every grid point (seed 0), then, in rounds of at
    most ``args.lr_extensions``, one step beyond the edge wherever the best rate lies on one.
    Return the swept cells and, per arm and grid point, the record of its sweep. A study run again
    replays the same rounds from the finished cells' results, so no finished cell runs twice."""
    points = [(arm, point) for arm in sweep_arms for point in grid]
    pending = {(arm, point): sorted(set(args.lrs)) for arm, point in points}
    extensions = dict.fromkeys(pending, 0)
    swept: list[Cell] = []
    for round_ in range(args.lr_extensions + 1):
        cells = [Cell(a, s, 0, lr, point, r, rule) for (a, s, r, rule), point in points
                 for lr in pending[(a, s, r, rule), point]]
        failed = [cell for cell in run_cells(cells, study, output, args.workers, reuse=args.reuse)
                  if not record_divergence(output, cell)]
        if failed:  # the best rates would be guesses
            raise NagError(f"{len(failed)} learning-rate sweep cell(s) failed: " + ", ".join(c.name for c in failed)
                           + f". Their logs are {output}/cells/NAME/fit.log; fix the cause and run the study again.")
        swept += cells
        losses = sweep_losses(swept, output)
        pending = {(arm, point): next_learning_rates(losses[arm[0], point]) for arm, point in points}
        if round_ == args.lr_extensions or not any(pending.values()):
            break
        for key, rates in pending.items():
            extensions[key] += bool(rates)
    records = []
    for (a, s, r, rule), point in points:
        rates = losses[a, point]
        records.append({"strategy": s, "arm": a, "depth": point, "rates": sorted(rates),
                        "val_losses": [None if math.isinf(rates[lr]) else rates[lr] for lr in sorted(rates)],
                        "best": best_rate(rates), "extensions": extensions[(a, s, r, rule), point],
                        # the best may lie beyond the sweep: the report says so
                        "at_edge": bool(pending[(a, s, r, rule), point])})
    return swept, records


def plan_and_run(kind: str, arms: list[SweepArm], grid: list[int | None], args: StudySettings, budget: dict,
                 reference: str | None = None) -> None:
    """Sweep the learning rate of every strategy (its first arm; every arm with ``lr_per_arm``)
    at every grid point, then run every arm × grid point × seed at its best rate there (its
    strategy's, where the arm was not swept itself). ``reference``: the arm the report compares
    the others with, where not its default (``study_report.reference_arm``)."""
    import time

    output = Path(args.output)
    started = time.time()
    study = {"kind": kind, "configs": [str(Path(c).resolve()) for c in args.config], "overrides": args.set,
             "learning_rates": args.lrs, "lr_extensions": args.lr_extensions, "seeds": args.seeds,
             "data_seed": DATA_SEED, "test_fraction": TEST_FRACTION, "margin": args.margin, "grid": grid, **budget,
             "arms": [{"arm": a, "strategy": s, "skip_rate": r, "skip_rule": rule} for a, s, r, rule in arms],
             "environment": environment(), **({"reference": reference} if reference else {}),
             **({"lr_per_arm": True} if args.lr_per_arm else {})}
    earlier_wall_s = check_resumable(output, study).get("wall_s_this_invocation")
    output.mkdir(parents=True, exist_ok=True)
    finished_before = finished_cells(output)
    write_atomically(output / "study.json", json.dumps(study, indent=2))
    first_arm = {s: next(arm for arm in arms if arm[1] == s) for s in dict.fromkeys(s for _, s, _, _ in arms)}
    swept_for = {arm: arm if args.lr_per_arm else first_arm[arm[1]] for arm in arms}  # whose sweep sets its rate
    sweep, study["learning_rate_sweeps"] = sweep_learning_rates(list(dict.fromkeys(swept_for.values())), grid, args,
                                                                study, output)
    best = {(record["arm"], record["depth"]): record["best"] for record in study["learning_rate_sweeps"]}
    cells = [Cell(a, s, seed, best[swept_for[a, s, r, rule][0], point], point, r, rule) for a, s, r, rule in arms
             for point in grid for seed in range(args.seeds)]
    failed = run_cells(cells, study, output, args.workers, reuse=args.reuse)
    main = set(cells)
    study["cells"] = [asdict(cell) | {"name": cell.name, "data_seed": cell.data_seed, "sweep": cell not in main}
                      for cell in dict.fromkeys(sweep + cells)]
    # An invocation that ran (or copied) no cell keeps the wall time of the one that did, so
    # republishing a finished study leaves its published study.json as it was.
    ran = finished_cells(output) != finished_before
    study["wall_s_this_invocation"] = time.time() - started if ran or earlier_wall_s is None else earlier_wall_s
    write_atomically(output / "study.json", json.dumps(study, indent=2))
    report(output)
    if failed:
        raise NagError(f"{len(failed)} cell(s) failed: " + ", ".join(c.name for c in failed)
                       + f". Their logs are {output}/cells/NAME/fit.log; run the study again to retry them.")


def budget_of(args: StudySettings) -> dict:
    if args.tokens and args.flops:
        raise NagError("nag study: give --tokens or --flops, not both.")
    if args.flops:
        return {"flops": args.flops}
    if args.tokens:
        data = instantiate(args.config, [f"--{key}={value}" for key, value in split_overrides(args.set)]).datamodule
        per_step = (data.global_batch_size or data.batch_size) * data.context_length
        return {"steps": max(1, math.ceil(args.tokens / per_step)), "tokens": args.tokens}
    return {}


def check_common(args: StudySettings) -> None:
    if not args.config:
        raise NagError("nag study: give the base config(s) with --config (e.g. configs/quickstart.yaml).")
    for path in args.config:
        if not Path(path).is_file():
            raise NagError(f"config file {path!r} does not exist.")
    if args.seeds < 1 or args.workers < 1 or not args.lrs or any(lr <= 0 for lr in args.lrs):
        raise NagError("nag study: --seeds and --workers must be >= 1 and --lrs positive.")
    if args.lr_extensions < 0 or not args.margin > 0:
        raise NagError("nag study: --lr_extensions must be >= 0 and --margin positive (nats of validation loss).")
    if any("=" not in o for o in args.set):
        raise NagError("nag study: --set takes KEY=VALUE items, e.g. trainer.limit_val_batches=20.")
    if any(key in ("data.init_args.seed", "data.seed") for key, _ in split_overrides(args.set)):
        raise NagError("nag study: each cell's seed sets data.init_args.seed; drop it from --set.")
    if any(key.endswith("test_fraction") for key, _ in split_overrides(args.set)):
        raise NagError(f"nag study: every cell holds out {TEST_FRACTION:g} of the validation split as its test split "
                       "(data.init_args.test_fraction); drop it from --set.")


def run_depth(settings: StudySettings, strategies: list[str], depths: list[int], reference: str | None = None) -> None:
    check_common(settings)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise NagError(f"nag study depth: unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}.")
    if reference is not None and reference not in strategies:
        raise NagError(f"nag study depth: --reference {reference} is not one of --strategies ({', '.join(strategies)}).")
    if not depths or any(d < 1 for d in depths):
        raise NagError("nag study depth: --depths must be positive block counts.")
    arms = [(s, s, 0.0, None) for s in strategies]
    plan_and_run("depth", arms, sorted(depths), settings, budget_of(settings), reference)


def known_skip_rule(text: str) -> bool:
    """Whether ``text`` is RULE or RULE+MODIFIER... (``SKIP_MODIFIERS``, each at most once)."""
    rule, modifiers = split_skip_rule(text)
    return rule in SKIP_RULES and all(m in SKIP_MODIFIERS for m in modifiers) and len(set(modifiers)) == len(modifiers)


def run_isoflop(settings: StudySettings, rates: list[float], skip_rule: str, budget: float | None,
                skip_rules: list[str] = (), peers: list[str] = ()) -> None:
    check_common(settings)
    if budget is None or budget <= 0:
        raise NagError("nag study isoflop: --budget F (executed training FLOPs per run) is required.")
    unknown = [rule for rule in (skip_rule, *skip_rules) if not known_skip_rule(rule)]
    if unknown:
        raise NagError(f"nag study isoflop: --skip_rule must be one of {', '.join(SKIP_RULES)} (and so must each of "
                       f"--skip_rules), optionally with +{' +'.join(SKIP_MODIFIERS)} (e.g. gate+per_layer); "
                       f"got {', '.join(unknown)}.")
    if any(split_skip_rule(rule)[0] == "last_layers" and "per_layer" in split_skip_rule(rule)[1]
           for rule in (skip_rule, *skip_rules)):
        raise NagError("nag study isoflop: last_layers drops the last sub-layers under one global threshold, so "
                       "last_layers+per_layer contradicts itself; use last_layers alone.")
    if any(peer not in LEARNED_ROUTERS for peer in peers):
        raise NagError(f"nag study isoflop: --peers takes {', '.join(LEARNED_ROUTERS)}, got {list(peers)}.")
    if any(not 0 <= r < 1 for r in rates):
        raise NagError("nag study isoflop: --rates must lie in [0, 1).")
    arms = [("prenorm", "prenorm", 0.0, None)] + [(f"nag@{r:g}", "nag", r, skip_rule) for r in rates]
    # Each further rule trains with that rule (the skip-sweep study only re-ranks rules on one training).
    arms += [(f"nag-{rule}@{r:g}", "nag", r, rule) for rule in dict.fromkeys(skip_rules) if rule != skip_rule
             for r in rates if r > 0]
    arms += [(f"{peer}@{r:g}", peer, r, None) for peer in dict.fromkeys(peers) for r in rates if r > 0]
    plan_and_run("isoflop", arms, [None], settings, {"flops": budget})


# The options every grid shares (depth, isoflop), documented once; each grid's function lists them.
_COMMON_DOC = """
        output: the study's folder (resumed if it exists).
        config: base config file(s), composed in order.
        set: KEY=VALUE overrides for every cell, e.g. --set trainer.limit_val_batches=20
            data.init_args.batch_size=4.
        seeds: seeds per cell of the grid; a seed sets the initialisation and the data order.
        lrs: learning rates each strategy is swept over at every grid point (seed 0); while the
            best lies at an edge, the sweep extends one step beyond it (the ratio of the edge rates;
            x3 for one rate).
        lr_extensions: at most this many such extensions per strategy and grid point.
        margin: equivalence margin in nats of validation loss: summary.md calls a difference
            equivalent when a TOST shows it lies within +-margin.
        workers: cells run in parallel processes.
        reuse: other study folders: a finished cell of theirs that ran exactly this study's
            ``nag fit`` for a cell (the same arguments but its folder, study design, environment
            and resolved configuration) is copied, not run again (``nag study reproduce`` passes
            the plan's other studies)."""


def depth(output: str, config: list[str] = [], set: list[str] = [], seeds: int = 3,  # noqa: A002, B006
          lrs: list[float] = [1e-3, 3e-3, 1e-2], lr_extensions: int = 3, margin: float = MARGIN,  # noqa: B006
          workers: int = 1, strategies: list[str] = ["prenorm", "nag"],  # noqa: B006
          depths: list[int] = [4, 8, 16], tokens: int | None = None, flops: float | None = None,  # noqa: B006
          reference: str | None = None, reuse: list[str] = []) -> None:  # noqa: B006
    run_depth(StudySettings(output, config, set, seeds, lrs, workers, tokens, flops, margin, lr_extensions, reuse),
              strategies, depths, reference)


def isoflop(output: str, config: list[str] = [], set: list[str] = [], seeds: int = 3,  # noqa: A002, B006
            lrs: list[float] = [1e-3, 3e-3, 1e-2], lr_extensions: int = 3, margin: float = MARGIN,  # noqa: B006
            workers: int = 1, rates: list[float] = [0.0, 0.1, 0.2, 0.25, 0.3],  # noqa: B006
            skip_rule: str = "step", budget: float | None = None, skip_rules: list[str] = [],  # noqa: B006
            peers: list[str] = [], reuse: list[str] = [], lr_per_arm: bool = False) -> None:  # noqa: B006
    run_isoflop(StudySettings(output, config, set, seeds, lrs, workers, margin=margin, lr_extensions=lr_extensions,
                              reuse=reuse, lr_per_arm=lr_per_arm), rates, skip_rule, budget, skip_rules, peers)


def skip(output: str, rates: list[float] = [0.0, 0.1, 0.2, 0.3, 0.4],  # noqa: B006
         skip_rules: list[str] = ["step", "abs_step", "gate", "random", "last_layers"],  # noqa: B006
         batches: int | None = None) -> None:
    """Skip-sweep of a study's NAG checkpoints per skip rule.

    Args:
        output: a study folder.
        rates: target skip rates in [0, 1).
        skip_rules: the rules to sweep each checkpoint under.
        batches: validation batches per rate (default: all).
    """
    skip_study(Path(output), rates, skip_rules, batches)


depth.__doc__ = f"""Residual strategies x depths x seeds.

    Args:{_COMMON_DOC}
        strategies: {", ".join(STRATEGIES)}.
        depths: numbers of blocks.
        tokens: training tokens per run.
        flops: executed training FLOPs per run.
        reference: the strategy every other one is compared with (default: prenorm; e.g. nag for
            an ablation study).
    """
isoflop.__doc__ = f"""NAG skip rates and pre-norm at one FLOP budget.

    Args:{_COMMON_DOC}
        rates: target skip rates.
        skip_rule: NAG's skip rule (configs/skip/): the arms nag@RATE.
        budget: executed training FLOPs per run.
        skip_rules: further rules, each trained with its own arms nag-RULE@RATE (the controls
            random and last_layers among them), for rates above 0. A rule may add +per_layer
            (a threshold per sub-layer) and/or +capacity (capacity mode), e.g. step+capacity.
        peers: learned-routing peers trained beside NAG at each rate above 0: router_mod
            (RouterMoD, top-k = 1 - RATE of each sequence in training, its causal predictor in
            evaluation), the arms router_mod@RATE.
        lr_per_arm: sweep the learning rate of every arm (each rate and rule), not only of each
            strategy's first arm (pre-norm, dense NAG, the router) whose rate the strategy's other
            arms then share. A study resumed with it keeps its finished cells.
    """
