"""Tables and figures of a ``nag study`` folder (``study.py``), rebuilt from its cells' ``result.json``.

Writes into the study folder: ``results.csv`` (one row per cell), ``summary.csv`` and
``summary.md`` (mean and standard deviation over seeds per arm and grid point; the difference
to the reference arm, ``reference_arm``, with a 95% confidence interval and p-value from
Welch's t-test, that p-value Holm-adjusted across the table's comparisons, an equivalence test
(TOST) at the study's margin, also Holm-adjusted, and a verdict; the smallest difference the
design detects with 80% power), ``trend.csv`` (depth studies: how each arm's difference to the
reference changes per doubling of depth), and figures: ``val_loss_vs_depth.png`` and
``norm_growth_vs_depth.png`` (depth studies; ``loss_per_seed.png`` where a depth study has
one depth), ``loss_vs_flops.png`` and ``skip_rate_per_layer.png``
(iso-FLOP studies).
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
from nag_lightning.commands.study_statistics import (ALPHA, detectable_difference, holm, slope, slope_of_means, tost,
                                                     verdict, welch)
from nag_lightning.errors import NagError
from nag_lightning.model.residual import BY_NAME
from nag_lightning.model.skip_policy import SKIP_RULES
from nag_lightning.reporting import atomic_file, render_table, write_atomically

MARGIN = 0.02  # equivalence margin in nats of validation loss, when a study does not record its own
FIGURES = {"val_loss_vs_depth.png", "norm_growth_vs_depth.png", "loss_per_seed.png", "loss_vs_flops.png",
           "skip_rate_per_layer.png"}
RESULT_KEYS = ["val_loss", "val_bpb", "test_loss", "test_bpb", "norm_growth", "executed_flops", "skip_rate",
               "executed_sublayers_std", "tokens", "steps", "wall_s"]


def reported_metric(study: dict) -> str:
    """The loss every table, test and figure compares: the held-out test split's when the study's
    cells hold one out (``test_fraction``: rates are chosen on validation, reported on test)."""
    return "test_loss" if study.get("test_fraction") else "val_loss"


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


def power_line(summary: list[dict]) -> str:
    """What the design could detect: for the median per-arm standard deviation over seeds and the
    fewest seeds any row has."""
    rows = [s for s in summary if not math.isnan(s[f"{s.get('reported', 'val_loss')}_std"])]
    if not rows:
        return ("Power: no row has two seeds, so there is no spread to size a detectable difference; "
                "use --seeds 2 or more.")
    sd = statistics.median(s[f"{s.get('reported', 'val_loss')}_std"] for s in rows)
    seeds = min(s["seeds"] for s in rows)
    return (f"Power: with {seeds} seeds per arm and the median per-arm standard deviation {sd:.4f} nats, the smallest "
            f"difference this design detects with 80% power at alpha 0.05 is {detectable_difference(sd, seeds):.4f} "
            "nats (normal approximation, 2.8 · sd · √(2/n)).")


def reference_arm(study: dict) -> str:
    """What the other arms are compared with: the study's own ``reference`` where it names one
    (an ablation study's NAG); dense NAG (rate 0) in an iso-FLOP study, where the question is what
    skipping costs at equal compute; otherwise pre-norm (or the first arm)."""
    if study.get("reference"):
        return study["reference"]
    arms = [a["arm"] for a in study["arms"]]
    if study["kind"] == "isoflop":
        dense = [a["arm"] for a in study["arms"] if a["strategy"] != "prenorm" and a["skip_rate"] == 0]
        if dense:
            return dense[0]
    return "prenorm" if "prenorm" in arms else arms[0]


def summarise(study: dict, rows: list[dict]) -> list[dict]:
    """Per arm and grid point (depth), over the seeds of the main cells."""
    metric = reported_metric(study)
    main = [r for r in rows if not r.get("sweep") and r.get(metric) is not None]
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
            losses = [c[metric] for c in cells]
            entry = {"arm": arm, "depth": point, "seeds": len(cells), "learning_rate": cells[0]["learning_rate"],
                     "reported": metric}
            for key in ("val_loss", "test_loss"):
                values = [c[key] for c in cells if c.get(key) is not None]
                entry[f"{key}_mean"] = statistics.fmean(values) if values else math.nan
                entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else math.nan
            for key in ("val_bpb", "norm_growth", "executed_flops", "skip_rate", "executed_sublayers_std"):
                values = [c[key] for c in cells if c.get(key) is not None]
                entry[f"{key}_mean"] = statistics.fmean(values) if values else math.nan
            base = [c[metric] for c in groups.get((reference, point), [])]
            if arm != reference and base:
                entry["reference"] = reference
                (entry["diff_vs_reference"], entry["ci95_low"], entry["ci95_high"],
                 entry["p_value"]) = welch(losses, base)
                entry["p_holm"] = math.nan  # filled in once the table's comparisons are all known
                entry["tost_p"] = tost(losses, base, study.get("margin", MARGIN))
                entry["tost_p_holm"], entry["verdict"] = math.nan, ""
            summary.append(entry)
    correct(summary)
    return summary


def correct(summary: list[dict]) -> None:
    """Holm-adjust the table's Welch and TOST p-values (each family: its comparisons with the
    reference arm) and give each comparison its verdict."""
    compared = [s for s in summary if "reference" in s]
    for key, adjusted_key in (("p_value", "p_holm"), ("tost_p", "tost_p_holm")):
        for entry, adjusted in zip(compared, holm([s[key] for s in compared])):
            entry[adjusted_key] = adjusted
    for entry in compared:
        entry["verdict"] = verdict(entry["p_holm"], entry["tost_p_holm"])


CONTROL_RULES = ("random", "last_layers")  # skip rules that do not look at the token: the controls


def split_skip_rule(text: str) -> tuple[str, list[str]]:
    """An iso-FLOP arm's skip rule ``RULE[+MODIFIER...]`` (``study.SKIP_MODIFIERS``) as (rule, modifiers)."""
    rule, *modifiers = text.split("+")
    return rule, modifiers


def rule_choice(study: dict, rows: list[dict]) -> list[dict]:
    """An iso-FLOP study's choice of the default skip rule, per skip rate above 0: the NAG arms
    whose rule looks at the token (the per-token candidates) ranked by mean validation loss (the
    split the study chooses on), and the best one compared on the reported loss (the held-out
    test split's, when the study has one, so the choice does not bias the test) with the
    runner-up, each control (``CONTROL_RULES``) and each learned router at that rate: Welch, TOST,
    Holm across that rate's comparisons. Empty for a depth study."""
    if study["kind"] != "isoflop":
        return []
    metric = reported_metric(study)
    losses, chosen_on = {}, {}
    for row in rows:
        if not row.get("sweep") and row.get(metric) is not None:
            losses.setdefault(row["arm"], []).append(row[metric])
            chosen_on.setdefault(row["arm"], []).append(row["val_loss"] if row.get("val_loss") is not None
                                                        else row[metric])
    choices = []
    for rate in sorted({a["skip_rate"] for a in study["arms"] if a["skip_rate"] > 0}):
        at_rate = [a for a in study["arms"] if a["skip_rate"] == rate and losses.get(a["arm"])]
        rule = {a["arm"]: split_skip_rule(a["skip_rule"] or "")[0] for a in at_rate}
        candidates = sorted((a["arm"] for a in at_rate if a["strategy"] == "nag" and rule[a["arm"]] not in CONTROL_RULES),
                            key=lambda arm: statistics.fmean(chosen_on[arm]))
        if not candidates:
            continue
        best = candidates[0]
        others = [(arm, "runner-up") for arm in candidates[1:2]]
        others += [(a["arm"], "control") for a in at_rate if a["strategy"] == "nag" and rule[a["arm"]] in CONTROL_RULES]
        others += [(a["arm"], "learned router") for a in at_rate if a["strategy"] != "nag"]
        entries = []
        for arm, role in others:
            difference, low, high, p = welch(losses[best], losses[arm])
            entries.append({"skip_rate": rate, "best": best, "ranking": " < ".join(candidates), "versus": arm,
                            "role": role, "diff": difference, "ci95_low": low, "ci95_high": high, "p_value": p,
                            "tost_p": tost(losses[best], losses[arm], study.get("margin", MARGIN))})
        for key, adjusted_key in (("p_value", "p_holm"), ("tost_p", "tost_p_holm")):
            for entry, adjusted in zip(entries, holm([e[key] for e in entries])):
                entry[adjusted_key] = adjusted
        for entry in entries:
            entry["verdict"] = verdict(entry["p_holm"], entry["tost_p_holm"])
        choices += entries or [{"skip_rate": rate, "best": best, "ranking": best}]
    return choices


def rule_choice_lines(choices: list[dict]) -> list[str]:
    """``rule_choice`` as summary.md's section, with a plain sentence where a control or a router wins."""
    lines = []
    for rate in dict.fromkeys(c["skip_rate"] for c in choices):
        entries = [c for c in choices if c["skip_rate"] == rate]
        best = entries[0]["best"]
        lines += ["", f"Choosing the default skip rule at rate {rate:g}: the per-token candidates ranked by mean "
                  f"validation loss (lowest first): {entries[0]['ranking']}. The best, {best}, against (on the "
                  "reported loss; Holm across this rate's comparisons):", "",
                  "| versus | role | Δ (best − versus) [95% CI] | p (Holm) | TOST p (Holm) | verdict |", "|---|---|---|---|---|---|"]
        for c in (c for c in entries if "versus" in c):
            lines.append(f"| {c['versus']} | {c['role']} | {c['diff']:+.3f} [{c['ci95_low']:+.3f}, {c['ci95_high']:+.3f}] | "
                         f"{c['p_holm']:.3f} | {c['tost_p_holm']:.3f} | {c['verdict']} |")
        beaten_by = [c["versus"] for c in entries if "versus" in c and c["role"] != "runner-up" and c["diff"] > 0
                     and c["verdict"] == "different"]
        if beaten_by:
            lines += ["", f"**Finding: {', '.join(beaten_by)} beat(s) every per-token rule at rate {rate:g} "
                      "(Holm-adjusted Welch p < 0.05).**"]
    return lines


def seed_losses(rows: list[dict], metric: str = "val_loss") -> dict[tuple[str, int], dict[int, float]]:
    """A depth study's main cells' final ``metric`` losses: per (arm, depth), per seed."""
    losses: dict[tuple[str, int], dict[int, float]] = {}
    for row in rows:
        if not row.get("sweep") and row.get(metric) is not None and row["depth"] is not None:
            losses.setdefault((row["arm"], row["depth"]), {})[row["seed"]] = row[metric]
    return losses


def depth_trend(study: dict, rows: list[dict]) -> list[dict]:
    """Per arm of a depth study, how its difference to the reference arm changes per doubling of
    depth: the slope of that difference on log2(depth); none for other studies.

    When at every depth some seed ran in both arms, the points are the per-seed differences of
    the seeds both ran (paired by seed, which cancels what a seed shares: its data order and, between
    strategies, much of its initialisation) and the slope is ordinary least squares (``slope``).
    Otherwise (cells failed so that a depth has no seed in common) the points are the per-depth
    differences of means, with the pooled within-group variance (``slope_of_means``); the
    ``pairing`` column says which."""
    if study["kind"] != "depth" or len(study["grid"]) < 2:  # one depth (an ablation study): no trend to test
        return []
    reference, losses = reference_arm(study), seed_losses(rows, reported_metric(study))
    trend = []
    for arm in [a["arm"] for a in study["arms"] if a["arm"] != reference]:
        depths = sorted({d for a, d in losses if a == arm} & {d for a, d in losses if a == reference})
        shared = {d: sorted(set(losses[arm, d]) & set(losses[reference, d])) for d in depths}
        if depths and all(shared.values()):
            pairing, points = "paired by seed", sum(map(len, shared.values()))
            fit = slope([math.log2(d) for d in depths for _ in shared[d]],
                        [losses[arm, d][s] - losses[reference, d][s] for d in depths for s in shared[d]])
        else:
            pairing, points = "difference of means, pooled variance", len(depths)
            fit = slope_of_means([math.log2(d) for d in depths], [list(losses[arm, d].values()) for d in depths],
                                 [list(losses[reference, d].values()) for d in depths])
        trend.append({"arm": arm, "reference": reference, "points": points, "depths": len(depths),
                      "pairing": pairing, **dict(zip(("slope_per_doubling", "ci95_low", "ci95_high", "p_value"), fit))})
    return trend


def trend_line(t: dict) -> str:
    if math.isnan(t["slope_per_doubling"]):
        return (f"- {t['arm']} − {t['reference']}: too few points for a trend ({t['points']} at {t['depths']} "
                "depth(s)).")
    return (f"- {t['arm']} − {t['reference']}: difference changes by {t['slope_per_doubling']:+.4f} nats per "
            f"doubling of depth, 95% CI [{t['ci95_low']:+.4f}, {t['ci95_high']:+.4f}], p = {t['p_value']:.3g} "
            f"({t['points']} points, {t['pairing']}).")


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    write_atomically(path, buffer.getvalue())


def sweep_lines(study: dict) -> list[str]:
    """The learning-rate sweeps: per strategy and grid point, the rates swept and the best, and
    whether the best still lay at an edge when the extensions ran out."""
    sweeps = study.get("learning_rate_sweeps")
    if sweeps is None:  # a study from before per-point sweeps
        return ["Learning rates swept per strategy (seed 0, first grid point): "
                + ", ".join(f"{lr:g}" for lr in study["learning_rates"]) + "; chosen: "
                + ", ".join(f"{name} {lr:g}" for name, lr in study.get("best_learning_rates", {}).items()) + "."]
    swept = ", ".join(f"{lr:g}" for lr in study["learning_rates"])
    per_arm = study.get("lr_per_arm", False)
    shared = not per_arm and len(study["arms"]) > len({a["strategy"] for a in study["arms"]})
    lines = [(f"Learning rates swept per {'arm' if per_arm else 'strategy'} and grid point (seed 0) from {swept}, "
              f"extended one step beyond an edge while the best lay there (at most {study['lr_extensions']} times)"
              + ("; a strategy's other arms use its first arm's rate" if shared else "") + ":")]
    for record in sweeps:
        where = "" if record["depth"] is None else f", depth {record['depth']}"
        edge = (f"; **still at the edge of the sweep after {record['extensions']} extension(s): the best rate may lie "
                "beyond it**" if record["at_edge"] else "")
        rates = ", ".join(f"{lr:g}" for lr in record["rates"])
        lines.append(f"- {record['arm'] if per_arm else record['strategy']}{where}: swept {rates}; "
                     f"best {record['best']:g}{edge}.")
    return lines


def comparison_line(study: dict, summary: list[dict]) -> str:
    """How the table's comparisons are tested: the margin, the correction and the verdict's rule."""
    compared = sum("reference" in s for s in summary)
    split = ("the held-out test split's loss (learning rates were chosen on the validation split, which it "
             f"excludes: its last {study['test_fraction']:g} of blocks)") if study.get("test_fraction") else \
        "the validation loss (the split the learning rates were chosen on: no held-out test split in this study)"
    return (f"Comparisons with the reference arm, {reference_arm(study)}, on {split}: Welch's t-test and, for "
            f"equivalence, TOST with margin ±{study.get('margin', MARGIN):g} nats; both p-values "
            f"Holm-corrected across this table's {compared} comparison(s); verdict: equivalent if Holm TOST "
            f"p < {ALPHA:g}, different if Holm Welch p < {ALPHA:g}, else inconclusive.")


def markdown(study: dict, summary: list[dict], rows: list[dict], trend: list[dict] | None = None) -> str:
    def number(value, digits=3):
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    lines = [f"# nag study {study['kind']}", "",
             f"Base config: {', '.join(study['configs'])}; overrides: {study['overrides'] or 'none'}; "
             f"budget: {study.get('tokens') or study.get('steps') or study.get('flops') or 'the config'}"
             f"{' tokens' if study.get('tokens') else ' executed FLOPs' if study.get('flops') else ''}; "
             f"seeds: {study['seeds']}"
             f"{' (each sets the initialisation and the data order)' if study.get('data_seed') else ''}.", "",
             *sweep_lines(study), "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in study.get("environment", {}).items()) + "; training wall "
             f"time of the {sum(r['wall_s'] is not None for r in rows)} finished cells: "
             f"{sum(r['wall_s'] or 0 for r in rows) / 3600:.2f} h (sum over cells).", "",
             comparison_line(study, summary), "", power_line(summary), "",
             f"| arm | depth | seeds | lr | {reported_metric(study).replace('_', ' ')} (mean ± std) | val bpb | norm growth | skip rate "
             "| sub-layers per token (sd) | executed FLOPs | Δ vs reference [95% CI] | p | p (Holm) | TOST p (Holm) "
             "| verdict |", "|" + "---|" * 15]
    for s in summary:
        diff = "" if "diff_vs_reference" not in s else \
            f"{s['diff_vs_reference']:+.3f} [{number(s['ci95_low'])}, {number(s['ci95_high'])}] vs {s['reference']}"
        lines.append(f"| {s['arm']} | {s['depth'] if s['depth'] is not None else ''} | {s['seeds']} | "
                     f"{s['learning_rate']:g} | {number(s[s['reported'] + '_mean'])} ± {number(s[s['reported'] + '_std'])} | "
                     f"{number(s['val_bpb_mean'])} | {number(s['norm_growth_mean'], 2)} | "
                     f"{number(s['skip_rate_mean'])} | {number(s['executed_sublayers_std_mean'], 2)} | "
                     f"{s['executed_flops_mean']:.3e} | {diff} | "
                     f"{number(s.get('p_value'))} | {number(s.get('p_holm'))} | {number(s.get('tost_p_holm'))} | "
                     f"{s.get('verdict', '')} |")
    lines += rule_choice_lines(rule_choice(study, rows))
    trend = depth_trend(study, rows) if trend is None else trend
    if trend:
        lines += ["", "Depth trend: the difference to the reference arm regressed on log2(depth) (least squares; "
                  "95% CI from the t distribution, with n − 2 degrees of freedom when paired by seed, the pooled "
                  "within-group ones for differences of means):", *map(trend_line, trend)]
    return "\n".join(lines) + "\n"


def legend_beside(axis) -> None:
    """The legend right of the plot: with ten arms, one inside hides their points."""
    axis.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small")


def per_seed_figure(study: dict, rows: list[dict], arms: list[str]):
    """One depth (the ablations): every seed's loss per arm, so that an arm whose seeds split
    (some train, some stall) shows as two clusters rather than a mean with a huge bar."""
    import matplotlib.pyplot as plt

    metric = reported_metric(study)
    figure, axis = plt.subplots(figsize=(6, 0.4 * len(arms) + 1.2))
    for position, arm in enumerate(arms):
        values = [r[metric] for r in rows if r["arm"] == arm and not r.get("sweep") and r[metric] is not None]
        axis.plot(values, [position] * len(values), "o", alpha=0.7, color="C0")
        if values:
            axis.plot([statistics.fmean(values)], [position], "|", markersize=14, color="C3")
    axis.set_yticks(range(len(arms)), arms)
    axis.invert_yaxis()
    axis.set_xlabel(f"final {metric.replace('_', ' ')} (nats/token): one dot per seed, bar = mean")
    return figure


def draw_figures(study: dict, rows: list[dict], summary: list[dict]) -> dict:
    """File name -> matplotlib figure of the study's plots (the notebooks show them inline)."""
    import matplotlib.pyplot as plt

    drawn = {}
    arms = list(dict.fromkeys(s["arm"] for s in summary))
    if study["kind"] == "depth" and len({s["depth"] for s in summary}) == 1:
        return {"loss_per_seed.png": per_seed_figure(study, rows, arms)}
    if study["kind"] == "depth":
        metric = reported_metric(study)
        for key, name, label, log in ((metric, "val_loss_vs_depth.png", f"final {metric.replace('_', ' ')} (nats/token)",
                                       False),
                                      ("norm_growth", "norm_growth_vs_depth.png", "residual norm growth", True)):
            figure, axis = plt.subplots(figsize=(6, 4))
            for arm in arms:
                points = [s for s in summary if s["arm"] == arm]
                per_depth = [[r[key] for r in rows if r["arm"] == arm and r["depth"] == p["depth"]
                              and not r.get("sweep") and r[key] is not None] for p in points]
                points, per_depth = [p for p, v in zip(points, per_depth) if v], [v for v in per_depth if v]
                if not points:  # nothing measured (a cell that logs no norm growth)
                    continue
                axis.errorbar([p["depth"] for p in points], [statistics.fmean(v) for v in per_depth],
                              yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in per_depth], marker="o",
                              capsize=3, label=arm)
            axis.set_xscale("log", base=2)
            axis.set_xlabel("blocks")
            axis.set_ylabel(label)
            if log and axis.lines:
                axis.set_yscale("log")
            if axis.lines:
                legend_beside(axis)
            drawn[name] = figure
        return drawn
    figure, axis = plt.subplots(figsize=(6, 4))
    for s in summary:
        mean, std = s[s["reported"] + "_mean"], s[s["reported"] + "_std"]
        axis.errorbar(s["executed_flops_mean"], mean, yerr=0 if math.isnan(std) else std, marker="o", capsize=3,
                      label=s["arm"])
    axis.set_xlabel("executed training FLOPs")
    axis.set_ylabel(f"final {reported_metric(study).replace('_', ' ')} (nats/token)")
    legend_beside(axis)
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
        legend_beside(axis)
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
    trend = depth_trend(study, rows)
    write_csv(output / "results.csv", rows)
    write_csv(output / "summary.csv", summary)
    if trend:
        write_csv(output / "trend.csv", trend)
    else:  # a report of an older version may have left one where no trend is tested
        (output / "trend.csv").unlink(missing_ok=True)
    choices = rule_choice(study, rows)
    if choices:
        write_csv(output / "rule_choice.csv", choices)
    text = markdown(study, summary, rows, trend)
    write_atomically(output / "summary.md", text)
    import matplotlib

    matplotlib.use("Agg")  # files only, whatever backend the caller had
    drawn = draw_figures(study, rows, summary)
    for stale in FIGURES - set(drawn):  # one an earlier report drew for another shape of study
        (output / stale).unlink(missing_ok=True)
    save_figures(output, drawn)
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
    legend_beside(axis)
    with atomic_file(output / "skip_study.png", "wb") as f:
        figure.savefig(f, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    print(render_table(["skip_rule", "target", "realized", "val_loss", "flops/token"],
                       [[r["skip_rule"], f"{r['target_rate']:g}", f"{r['realized_rate']:.3f}", f"{r['val_loss']:.4f}",
                         f"{r['forward_flops_per_token']:.3e}"] for r in rows]))
    return rows
