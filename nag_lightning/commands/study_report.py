"""Tables and figures of a ``nag study`` folder (``study.py``), rebuilt from its cells' ``result.json``.

Writes into the study folder: ``results.csv`` (one row per cell), ``summary.csv`` and
``summary.md`` (mean and standard deviation over seeds per arm and grid point; the difference
to the reference arm, ``reference_arm``, with a 95% confidence interval and p-value from
Welch's t-test), and figures: ``val_loss_vs_depth.png`` and ``norm_growth_vs_depth.png``
(depth studies), ``loss_vs_flops.png`` and ``skip_rate_per_layer.png`` (iso-FLOP studies).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

from nag_lightning.commands.runs import load_run
from nag_lightning.commands.skip_sweep import sweep
from nag_lightning.errors import NagError
from nag_lightning.model.residual import BY_NAME
from nag_lightning.model.skip_policy import SKIP_RULES
from nag_lightning.reporting import atomic_file, render_table, write_atomically

RESULT_KEYS = ["val_loss", "val_bpb", "norm_growth", "executed_flops", "skip_rate", "tokens", "steps", "wall_s"]


def load_cells(output: Path) -> tuple[dict, list[dict]]:
    """The study's settings and one row per cell (its settings and, when finished, its results)."""
    path = output / "study.json"
    if not path.is_file():
        raise NagError(f"{output} is not a study folder (no study.json); run `nag study depth|isoflop` first.")
    study = json.loads(path.read_text())
    rows = []
    for cell in study.get("cells", []):
        result_path = output / "cells" / cell["name"] / "result.json"
        result = json.loads(result_path.read_text()) if result_path.is_file() else {}
        rows.append({**cell, **{key: result.get(key) for key in RESULT_KEYS},
                     "skip_rate_per_layer": result.get("skip_rate_per_layer")})
    return study, rows


def welch(values: list[float], reference: list[float]) -> tuple[float, float, float, float]:
    """(mean difference, 95% CI low, high, p-value) of ``values`` minus ``reference`` (Welch's t-test)."""
    difference = statistics.fmean(values) - statistics.fmean(reference)
    if len(values) < 2 or len(reference) < 2:
        return difference, math.nan, math.nan, math.nan
    from scipy import stats

    test = stats.ttest_ind(values, reference, equal_var=False)
    interval = test.confidence_interval(0.95)
    return difference, float(interval.low), float(interval.high), float(test.pvalue)


def reference_arm(study: dict) -> str:
    """What the other arms are compared with: dense NAG (rate 0) in an iso-FLOP study, where the
    question is what skipping costs at equal compute; otherwise pre-norm (or the first arm)."""
    arms = [a["arm"] for a in study["arms"]]
    if study["kind"] == "isoflop":
        dense = [a["arm"] for a in study["arms"] if a["strategy"] != "prenorm" and a["skip_rate"] == 0]
        if dense:
            return dense[0]
    return "prenorm" if "prenorm" in arms else arms[0]


def summarise(study: dict, rows: list[dict]) -> list[dict]:
    """Per arm and grid point (depth), over the seeds of the main cells."""
    main = [r for r in rows if not r.get("sweep") and r["val_loss"] is not None]
    arms = [a["arm"] for a in study["arms"]]
    reference = reference_arm(study)
    groups: dict[tuple, list[dict]] = {}
    for row in main:
        groups.setdefault((row["arm"], row["depth"]), []).append(row)
    summary = []
    for arm in arms:
        for point in study["grid"]:
            cells = groups.get((arm, point))
            if not cells:
                continue
            losses = [c["val_loss"] for c in cells]
            entry = {"arm": arm, "depth": point, "seeds": len(cells), "learning_rate": cells[0]["learning_rate"],
                     "val_loss_mean": statistics.fmean(losses),
                     "val_loss_std": statistics.stdev(losses) if len(losses) > 1 else math.nan}
            for key in ("val_bpb", "norm_growth", "executed_flops", "skip_rate"):
                values = [c[key] for c in cells if c[key] is not None]
                entry[f"{key}_mean"] = statistics.fmean(values) if values else math.nan
            base = [c["val_loss"] for c in groups.get((reference, point), [])]
            if arm != reference and base:
                entry["reference"] = reference
                (entry["diff_vs_reference"], entry["ci95_low"], entry["ci95_high"],
                 entry["p_value"]) = welch(losses, base)
            summary.append(entry)
    return summary


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    write_atomically(path, buffer.getvalue())


def markdown(study: dict, summary: list[dict], rows: list[dict]) -> str:
    def number(value, digits=3):
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    lines = [f"# nag study {study['kind']}", "",
             f"Base config: {', '.join(study['configs'])}; overrides: {study['overrides'] or 'none'}; "
             f"budget: {study.get('tokens') or study.get('steps') or study.get('flops') or 'the config'}"
             f"{' tokens' if study.get('tokens') else ' executed FLOPs' if study.get('flops') else ''}; "
             f"seeds: {study['seeds']}.", "",
             "Learning rates swept per strategy (seed 0, first grid point): "
             + ", ".join(f"{lr:g}" for lr in study["learning_rates"]) + "; chosen: "
             + ", ".join(f"{name} {lr:g}" for name, lr in study.get("best_learning_rates", {}).items()) + ".", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in study.get("environment", {}).items()) + "; training wall "
             f"time of the {sum(r['wall_s'] is not None for r in rows)} finished cells: "
             f"{sum(r['wall_s'] or 0 for r in rows) / 3600:.2f} h (sum over cells).", "",
             "| arm | depth | seeds | lr | val loss (mean ± std) | val bpb | norm growth | skip rate | executed FLOPs "
             "| Δ vs reference [95% CI] | p |", "|" + "---|" * 11]
    for s in summary:
        diff = "" if "diff_vs_reference" not in s else \
            f"{s['diff_vs_reference']:+.3f} [{number(s['ci95_low'])}, {number(s['ci95_high'])}] vs {s['reference']}"
        lines.append(f"| {s['arm']} | {s['depth'] if s['depth'] is not None else ''} | {s['seeds']} | "
                     f"{s['learning_rate']:g} | {number(s['val_loss_mean'])} ± {number(s['val_loss_std'])} | "
                     f"{number(s['val_bpb_mean'])} | {number(s['norm_growth_mean'], 2)} | "
                     f"{number(s['skip_rate_mean'])} | {s['executed_flops_mean']:.3e} | {diff} | "
                     f"{number(s.get('p_value'))} |")
    return "\n".join(lines) + "\n"


def draw_figures(study: dict, rows: list[dict], summary: list[dict]) -> dict:
    """File name -> matplotlib figure of the study's plots (the notebooks show them inline)."""
    import matplotlib.pyplot as plt

    drawn = {}
    arms = list(dict.fromkeys(s["arm"] for s in summary))
    if study["kind"] == "depth":
        for key, name, label, log in (("val_loss", "val_loss_vs_depth.png", "final val loss (nats/token)", False),
                                      ("norm_growth", "norm_growth_vs_depth.png", "residual norm growth", True)):
            figure, axis = plt.subplots(figsize=(6, 4))
            for arm in arms:
                points = [s for s in summary if s["arm"] == arm]
                per_depth = [[r[key] for r in rows if r["arm"] == arm and r["depth"] == p["depth"]
                              and not r.get("sweep") and r[key] is not None] for p in points]
                axis.errorbar([p["depth"] for p in points], [statistics.fmean(v) for v in per_depth],
                              yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in per_depth], marker="o",
                              capsize=3, label=arm)
            axis.set_xscale("log", base=2)
            axis.set_xlabel("blocks")
            axis.set_ylabel(label)
            if log:
                axis.set_yscale("log")
            axis.legend()
            drawn[name] = figure
        return drawn
    figure, axis = plt.subplots(figsize=(6, 4))
    for s in summary:
        axis.errorbar(s["executed_flops_mean"], s["val_loss_mean"], yerr=0 if math.isnan(s["val_loss_std"]) else
                      s["val_loss_std"], marker="o", capsize=3, label=s["arm"])
    axis.set_xlabel("executed training FLOPs")
    axis.set_ylabel("final val loss (nats/token)")
    axis.legend()
    drawn["loss_vs_flops.png"] = figure
    figure, axis = plt.subplots(figsize=(6, 4))
    for arm in arms:
        layers = [r["skip_rate_per_layer"] for r in rows if r["arm"] == arm and not r.get("sweep")
                  and r["skip_rate_per_layer"]]
        if layers:
            mean = [statistics.fmean(values) for values in zip(*layers)]
            axis.plot(range(1, len(mean) + 1), mean, marker="o", label=arm)
    axis.set_xlabel("sub-layer")
    axis.set_ylabel("skip rate at the final validation")
    if axis.lines:
        axis.legend()
    drawn["skip_rate_per_layer.png"] = figure
    return drawn


def save_figures(output: Path, drawn: dict) -> None:
    import matplotlib.pyplot as plt

    for name, figure in drawn.items():
        with atomic_file(output / name, "wb") as f:
            figure.savefig(f, format="png", dpi=120, bbox_inches="tight")
        plt.close(figure)


def report(output: Path) -> list[dict]:
    """Write every table and figure of the study folder ``output``; return the summary rows."""
    study, rows = load_cells(output)
    summary = summarise(study, rows)
    write_csv(output / "results.csv", rows)
    write_csv(output / "summary.csv", summary)
    text = markdown(study, summary, rows)
    write_atomically(output / "summary.md", text)
    import matplotlib

    matplotlib.use("Agg")  # files only, whatever backend the caller had
    save_figures(output, draw_figures(study, rows, summary))
    print(text)
    return summary


def skip_study(output: Path, rates: list[float], rules: list[str], batches: int | None) -> list[dict]:
    """``skip-sweep`` of every finished NAG-family cell of a study under each skip rule: writes
    ``skip_study.csv`` and ``skip_study.png`` (val loss against executed forward FLOPs per token,
    mean over cells, one line per rule)."""

    if any(rule not in SKIP_RULES for rule in rules):
        raise NagError(f"nag study skip: --skip_rules must be among {', '.join(SKIP_RULES)}.")
    if any(not 0 <= r < 1 for r in rates):
        raise NagError("nag study skip: --rates must lie in [0, 1).")
    study, cells = load_cells(output)
    checkpoints = [(c, output / "cells" / c["name"] / "checkpoints" / "last.ckpt") for c in cells
                   if BY_NAME[c["strategy"]].gated and not c.get("sweep")]
    checkpoints = [(c, path) for c, path in checkpoints if path.is_file()]
    if not checkpoints:
        raise NagError(f"{output} has no finished NAG cells with a last.ckpt to sweep.")
    rows = []
    for cell, path in checkpoints:
        loaded = load_run(path)
        skip = loaded.model.model.require_skipping("nag study skip").config
        for rule in rules:
            if rule == "last_layers" and skip.threshold_scope != "global":
                continue
            skip.rule = rule  # how the checkpoint runs, not its weights
            for row in sweep(loaded, rates, batches):
                rows.append({"cell": cell["name"], "arm": cell["arm"], "skip_rule": rule, **row})
    write_csv(output / "skip_study.csv", rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for rule in rules:
        points = {}
        for row in rows:
            if row["skip_rule"] == rule:
                points.setdefault(row["target_rate"], []).append(row)
        if points:
            ordered = [points[r] for r in sorted(points)]
            axis.plot([statistics.fmean(p["forward_flops_per_token"] for p in g) for g in ordered],
                      [statistics.fmean(p["val_loss"] for p in g) for g in ordered], marker="o", label=rule)
    axis.set_xlabel("executed forward FLOPs per token")
    axis.set_ylabel("val loss (nats/token)")
    axis.legend()
    with atomic_file(output / "skip_study.png", "wb") as f:
        figure.savefig(f, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    print(render_table(["skip_rule", "target", "realized", "val_loss", "flops/token"],
                       [[r["skip_rule"], f"{r['target_rate']:g}", f"{r['realized_rate']:.3f}", f"{r['val_loss']:.4f}",
                         f"{r['forward_flops_per_token']:.3e}"] for r in rows]))
    return rows
