"""The statistics of `nag study` on synthetic numbers (no training): Holm's correction, the
equivalence test and the verdict, the depth trend, the power line, the learning-rate sweep's
extension beyond an edge, and the refusal of a study folder planned otherwise."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import TINY
from nag_lightning.commands import study as study_module
from nag_lightning.commands.study import Cell, StudySettings, check_resumable, next_learning_rates, sweep_learning_rates
from nag_lightning.commands.study_report import (depth_trend, draw_figures, load_cells, markdown, power_line,
                                                 reference_arm, report, rule_choice, rule_choice_lines, summarise)
from nag_lightning.commands.study_statistics import (detectable_difference, holm, slope, slope_of_means, tost, verdict,
                                                     welch)
from nag_lightning.errors import NagError

T_975_6 = 2.4469118511449692  # the t distribution's 97.5% quantile at 6 degrees of freedom (tables)


def test_holm_multiplies_the_ith_smallest_of_m_by_m_minus_i_plus_1_and_keeps_the_order():
    # Sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04, raised to 0.06 (monotone).
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)
    adjusted = holm([0.01, math.nan, 0.6])  # no test is no comparison: m = 2
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == 0.6
    assert holm([0.5, 0.7]) == [1.0, 1.0]  # capped at 1
    assert holm([]) == []


def _welch_one_sided(values, reference, shift, greater):
    """By hand: Welch's t for mean(values) - mean(reference) against ``shift``, one-sided p."""
    from scipy import stats

    def mean_var(xs):
        mean = sum(xs) / len(xs)
        return mean, sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs)

    (m1, v1), (m2, v2) = mean_var(values), mean_var(reference)
    t = (m1 - m2 - shift) / math.sqrt(v1 + v2)
    dof = (v1 + v2) ** 2 / (v1 ** 2 / (len(values) - 1) + v2 ** 2 / (len(reference) - 1))
    return stats.t.sf(t, dof) if greater else stats.t.cdf(t, dof)


def test_tost_is_the_larger_of_two_one_sided_welch_tests_against_the_margin():
    reference = [3.000, 3.002, 2.998, 3.001, 2.999]
    close = [3.001, 2.999, 3.003, 3.000, 2.998]  # within 0.005 of the reference: equivalent at 0.02
    far = [v + 0.05 for v in close]  # 0.05 nats worse: not equivalent at 0.02
    p_close, p_far = tost(close, reference, 0.02), tost(far, reference, 0.02)
    assert p_close < 1e-6 and p_far > 0.99
    for values, p in ((close, p_close), (far, p_far)):
        by_hand = max(_welch_one_sided(values, reference, -0.02, greater=True),
                      _welch_one_sided(values, reference, 0.02, greater=False))
        assert p == pytest.approx(by_hand, rel=1e-9, abs=1e-15)
    noisy = [3.05, 2.95, 3.0]  # centred on the reference but too spread out to show equivalence
    assert tost(noisy, reference, 0.02) > 0.05
    assert math.isnan(tost([3.0], reference, 0.02))  # one seed: no test


def test_the_verdict_needs_a_holm_adjusted_test_and_equivalence_is_checked_first():
    assert verdict(p_holm=0.5, tost_p_holm=0.01) == "equivalent"
    assert verdict(p_holm=0.01, tost_p_holm=0.5) == "different"
    assert verdict(p_holm=0.01, tost_p_holm=0.01) == "equivalent"  # real, but smaller than the margin
    assert verdict(p_holm=0.2, tost_p_holm=0.3) == "inconclusive"
    assert verdict(p_holm=math.nan, tost_p_holm=math.nan) == "inconclusive"  # one seed


def _row(arm, depth, seed, loss, sweep=False):
    return {"arm": arm, "strategy": arm, "depth": depth, "seed": seed, "learning_rate": 0.01, "sweep": sweep,
            "val_loss": loss, "val_bpb": loss / math.log(2), "norm_growth": 1.0, "executed_flops": 1e9,
            "skip_rate": 0.0, "wall_s": 1.0}


def _study(arms, grid, seeds):
    return {"kind": "depth", "configs": ["tiny.yaml"], "overrides": [], "learning_rates": [0.01], "seeds": seeds,
            "lr_extensions": 3, "data_seed": "the cell's seed", "margin": 0.02, "grid": grid,
            "arms": [{"arm": a, "strategy": a, "skip_rate": 0.0, "skip_rule": None} for a in arms],
            "learning_rate_sweeps": [{"strategy": a, "arm": a, "depth": d, "rates": [0.003, 0.01], "best": 0.01,
                                      "extensions": 3, "at_edge": a == "nag" and d == grid[-1]}
                                     for a in arms for d in grid]}


def test_a_table_holm_corrects_its_comparisons_and_gives_each_a_verdict():
    study = _study(["prenorm", "nag", "same"], [4, 8], seeds=4)
    noise = [0.001, -0.001, 0.002, -0.002]
    rows = [_row("prenorm", d, s, 3.0 + noise[s]) for d in (4, 8) for s in range(4)]
    rows += [_row("nag", d, s, 2.9 + noise[s - 1]) for d in (4, 8) for s in range(4)]  # 0.1 nats better
    rows += [_row("same", d, s, 3.0 + noise[s - 2]) for d in (4, 8) for s in range(4)]  # the reference's spread
    rows.append(_row("nag", 4, 0, 9.0, sweep=True))  # a sweep cell is no seed of the table
    summary = summarise(study, rows)
    compared = [s for s in summary if "reference" in s]
    assert len(compared) == 4 and {s["reference"] for s in compared} == {"prenorm"}
    assert [s["p_holm"] for s in compared] == holm([s["p_value"] for s in compared])
    assert [s["tost_p_holm"] for s in compared] == holm([s["tost_p"] for s in compared])
    assert {(s["arm"], s["verdict"]) for s in compared} == {("nag", "different"), ("same", "equivalent")}
    text = markdown(study, summary, rows)
    assert ("TOST with margin ±0.02 nats; both p-values Holm-corrected across this table's "
            "4 comparison(s)") in text
    assert text.index("Holm-corrected") < text.index("| arm |") and text.index("Power:") < text.index("| arm |")
    assert "| nag | 8 | 4 |" in text and "| different |" in text and "| equivalent |" in text
    assert "- nag, depth 8: swept 0.003, 0.01; best 0.01; **still at the edge" in text
    assert "- nag, depth 4: swept 0.003, 0.01; best 0.01." in text


def test_the_depth_trend_is_the_least_squares_slope_of_per_seed_differences_on_log2_depth():
    depths, noise = [4, 8, 16, 32], [0.002, -0.002, 0.001, -0.001, -0.001, 0.001, 0.002, -0.002]
    rows, x, y = [], [], []
    for i, depth in enumerate(depths):
        for seed in (0, 1):
            reference = 3.0 - 0.05 * math.log2(depth) + 0.1 * seed  # what the seed shares cancels out
            difference = 0.01 * math.log2(depth) + noise[2 * i + seed]
            rows += [_row("prenorm", depth, seed, reference), _row("nag", depth, seed, reference + difference)]
            x.append(math.log2(depth))
            y.append(difference)
    rows.append(_row("nag", 4, 5, 99.0))  # seed 5 has no reference cell: no pair, no point
    (trend,) = depth_trend(_study(["prenorm", "nag"], depths, seeds=2), rows)
    assert trend["pairing"] == "paired by seed" and trend["points"] == 8 and trend["depths"] == 4
    # By hand, in float64: the noise is symmetric at each depth, so the slope is 0.01, the residuals
    # are the noise (SSE = 2e-5), Sxx = 10 and the standard error sqrt(SSE / 6 / Sxx) = 1e-3 / sqrt(3).
    mean_x, mean_y = sum(x) / 8, sum(y) / 8
    sxx = sum((a - mean_x) ** 2 for a in x)
    fitted = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y)) / sxx
    sse = sum((b - mean_y - fitted * (a - mean_x)) ** 2 for a, b in zip(x, y))
    error = math.sqrt(sse / 6 / sxx)
    assert sxx == 10 and fitted == pytest.approx(0.01, abs=1e-15) and error == pytest.approx(1e-3 / math.sqrt(3))
    assert trend["slope_per_doubling"] == pytest.approx(fitted, abs=1e-14)
    assert trend["ci95_low"] == pytest.approx(fitted - T_975_6 * error, abs=1e-12)
    assert trend["ci95_high"] == pytest.approx(fitted + T_975_6 * error, abs=1e-12)
    from scipy import stats

    assert trend["p_value"] == pytest.approx(2 * stats.t.sf(fitted / error, 6), rel=1e-9)
    assert trend["p_value"] < 1e-4
    assert math.isnan(slope([2.0, 3.0], [0.1, 0.2])[0])  # two points: no interval
    # A study at one depth (the ablations) has no trend to test: no trend.csv, no trend lines.
    assert depth_trend(_study(["prenorm", "nag"], [8], seeds=2), [r for r in rows if r["depth"] == 8]) == []


def test_without_seeds_in_common_the_trend_regresses_differences_of_means_with_pooled_variance():
    # Differences of means 0, 0.1, 0.2 at log2 depth 2, 3, 4: slope 0.1. Every group's variance is
    # 0.02 (two values 0.2 apart), pooled over 6 groups of 2: 6 degrees of freedom; each difference's
    # variance 0.02 (1/2 + 1/2) = 0.02, the slope's sum(c^2 0.02) / Sxx^2 = 2 x 0.02 / 4 = 0.01.
    mine = [[1.0, 1.2], [1.1, 1.3], [1.2, 1.4]]
    base = [[1.0, 1.2]] * 3
    fitted, low, high, p = slope_of_means([2.0, 3.0, 4.0], mine, base)
    assert fitted == pytest.approx(0.1, abs=1e-14)
    assert (low, high) == pytest.approx((0.1 - T_975_6 * 0.1, 0.1 + T_975_6 * 0.1), abs=1e-12)
    from scipy import stats

    assert p == pytest.approx(2 * stats.t.sf(1.0, 6), rel=1e-9)
    rows = [_row("prenorm", d, s, v) for d, group in zip((4, 8, 16), base) for s, v in enumerate(group)]
    rows += [_row("nag", d, s + 2, v) for d, group in zip((4, 8, 16), mine) for s, v in enumerate(group)]
    (trend,) = depth_trend(_study(["prenorm", "nag"], [4, 8, 16], seeds=2), rows)
    assert trend["pairing"] == "difference of means, pooled variance" and trend["points"] == 3
    assert trend["slope_per_doubling"] == pytest.approx(0.1) and trend["p_value"] == pytest.approx(p)


def test_the_trend_line_in_summary_md():
    depths = [4, 8, 16]

    def loss(arm, depth, seed):  # nag's difference: 0.02 per doubling, +-0.001 around it at each depth
        difference = 0.02 * math.log2(depth) + 0.001 * (-1) ** (seed + depth // 4)
        return 3.0 + 0.01 * seed + (difference if arm == "nag" else 0)

    rows = [_row(arm, d, s, loss(arm, d, s)) for arm in ("prenorm", "nag") for d in depths for s in (0, 1)]
    study = _study(["prenorm", "nag"], depths, seeds=2)
    text = markdown(study, summarise(study, rows), rows)
    assert "Depth trend: the difference to the reference arm regressed on log2(depth)" in text
    assert "- nag − prenorm: difference changes by +0.0200 nats per doubling of depth, 95% CI [+0.01" in text
    assert "(6 points, paired by seed)" in text
    assert "too few points for a trend (2 at 1 depth(s))" in markdown(study, [], rows[:2] + rows[6:8])


def test_the_power_line_states_the_smallest_difference_the_design_detects():
    assert detectable_difference(0.01, 2) == pytest.approx(2.8 * 0.01)
    summary = [{"val_loss_std": sd, "seeds": 3} for sd in (0.01, 0.03, 0.02)] + [{"val_loss_std": math.nan, "seeds": 1}]
    line = power_line(summary)
    # median sd 0.02, 3 seeds: 2.8 x 0.02 x sqrt(2/3) = 0.0457
    assert line.startswith("Power: with 3 seeds per arm and the median per-arm standard deviation 0.0200 nats")
    assert "detects with 80% power at alpha 0.05 is 0.0457 nats" in line
    assert "use --seeds 2 or more" in power_line([{"val_loss_std": math.nan, "seeds": 1}])


def test_a_sweep_extends_beyond_the_edge_where_its_best_rate_lies():
    assert next_learning_rates({1e-3: 5.0, 3e-3: 4.5, 1e-2: 4.8}) == []  # inside: done
    assert next_learning_rates({1e-3: 4.0, 3e-3: 4.5, 1e-2: 4.8}) == [0.000333333]  # the edge's own ratio, 3
    assert next_learning_rates({1e-3: 5.0, 3e-3: 4.8, 1e-2: 4.5}) == [0.0333333]  # 10/3 above
    assert next_learning_rates({0.01: 4.0}) == [0.00333333, 0.03]  # one rate: x3 both ways
    assert next_learning_rates({1e-3: 5.0, 3e-3: 4.5, 1e-2: math.inf}) == []  # a diverged rate never wins
    assert next_learning_rates({1e-3: math.inf, 3e-3: math.inf}) == [0.000333333]  # all diverged: go lower
    assert next_learning_rates({0.01: 4.5, 0.03: 4.0}) == [0.09]


def _fake_fit(losses_by_arm, ran):
    """A stand-in for the `nag fit` subprocess: writes the result.json of the curve of its arm."""

    def run(command, stdout, stderr, env):
        args = command[command.index("fit") + 1:]
        folder = Path(args[args.index("--trainer.logger.init_args.save_dir") + 1])
        rate = float(args[args.index("--model.init_args.learning_rate") + 1])
        assert args[args.index("--data.init_args.seed") + 1] == args[args.index("--seed_everything") + 1]
        loss = losses_by_arm[folder.name.split("-")[0]](rate)
        assert args[args.index("--data.init_args.test_fraction") + 1] == "0.5"
        (folder / "result.json").write_text(json.dumps({"val_loss": loss, "test_loss": loss + 0.01}))
        ran.append(folder.name)
        return SimpleNamespace(returncode=0)

    return run


def test_the_sweep_runs_every_strategy_at_every_grid_point_extends_boundedly_and_resumes(tmp_path, monkeypatch):
    curves = {"prenorm": lambda lr: (math.log10(lr) + 1.3) ** 2,  # best near 0.05: two steps above 0.01
              "nag": lambda lr: -math.log10(lr)}  # always better higher: at the edge after every extension
    ran = []
    monkeypatch.setattr(study_module.subprocess, "run", _fake_fit(curves, ran))
    arms = [("prenorm", "prenorm", 0.0, None), ("nag", "nag", 0.0, None)]
    settings = StudySettings(str(tmp_path), [], [], 1, [1e-3, 3e-3, 1e-2], 2, lr_extensions=3)
    swept, records = sweep_learning_rates(arms, [4, 8], settings, {"configs": [], "test_fraction": 0.5}, tmp_path)
    by_point = {(r["strategy"], r["depth"]): r for r in records}
    assert set(by_point) == {(s, d) for s in ("prenorm", "nag") for d in (4, 8)}
    for depth in (4, 8):
        prenorm, nag = by_point["prenorm", depth], by_point["nag", depth]
        assert prenorm["rates"] == [1e-3, 3e-3, 1e-2, 0.0333333, 0.111111] and prenorm["best"] == 0.0333333
        assert prenorm["extensions"] == 2 and not prenorm["at_edge"]
        assert nag["rates"] == [1e-3, 3e-3, 1e-2, 0.0333333, 0.111111, 0.37037] and nag["best"] == 0.37037
        assert nag["extensions"] == 3 and nag["at_edge"]  # the bound, and the report says the best may lie beyond
        assert nag["val_losses"][0] == pytest.approx(3.0)
    assert len(ran) == len(swept) == 2 * (3 + 2) + 2 * (3 + 3)
    assert all(cell.seed == 0 and cell.data_seed == 0 for cell in swept)
    ran.clear()  # run again: every cell is finished, the same rounds replay from their results
    again, records_again = sweep_learning_rates(arms, [4, 8], settings, {"configs": [], "test_fraction": 0.5}, tmp_path)
    assert ran == [] and again == swept and records_again == records
    no_extensions = StudySettings(str(tmp_path), [], [], 1, [1e-3, 3e-3, 1e-2], 2, lr_extensions=0)
    _, records = sweep_learning_rates(arms, [4], no_extensions, {"configs": [], "test_fraction": 0.5}, tmp_path)
    assert ran == [] and all(r["at_edge"] and r["extensions"] == 0 and r["best"] == 1e-2 for r in records)


def test_a_cell_seeds_its_data_order_and_an_older_study_folder_is_refused(tmp_path):
    args = Cell("nag", "nag", 2, 0.01, 4).fit_arguments({"configs": [], "test_fraction": 0.5}, tmp_path)
    assert args[args.index("--data.init_args.seed") + 1] == "2" == args[args.index("--seed_everything") + 1]
    study = {"kind": "depth", "configs": [], "overrides": [], "learning_rates": [0.01], "data_seed": "the cell's seed"}
    check_resumable(tmp_path, study)  # no study.json: a new study
    (tmp_path / "study.json").write_text(json.dumps({k: v for k, v in study.items() if k != "data_seed"}))
    with pytest.raises(NagError, match="kept the config's data order for every seed; use another --output"):
        check_resumable(tmp_path, study)
    (tmp_path / "study.json").write_text(json.dumps(study))
    check_resumable(tmp_path, study)
    with pytest.raises(NagError, match=r"other settings \(learning_rates\)"):
        check_resumable(tmp_path, {**study, "learning_rates": [0.003]})


def test_an_isoflop_study_trains_each_rule_and_the_router_peer_with_its_own_arms(monkeypatch, tmp_path):
    planned = {}
    monkeypatch.setattr(study_module, "plan_and_run", lambda kind, arms, grid, settings, budget, reference=None: planned.update(arms=arms))
    settings = StudySettings(str(tmp_path / "s"), [TINY], [], 4, [0.01], 1)
    study_module.run_isoflop(settings, [0.0, 0.25], "step", 1e12, ["random", "gate", "step"], ["router_mod"])
    assert [a[0] for a in planned["arms"]] == ["prenorm", "nag@0", "nag@0.25", "nag-random@0.25", "nag-gate@0.25",
                                              "router_mod@0.25"]
    router = Cell("router_mod@0.25", "router_mod", 1, 0.01, None, 0.25, None)
    args = router.fit_arguments({"configs": [TINY], "flops": 1e12, "test_fraction": 0.5}, tmp_path)
    assert args[args.index("--model.init_args.config.skip.mode") + 1] == "topk"
    assert args[args.index("--model.init_args.config.skip.topk_capacity") + 1] == "0.75"
    assert not any("SkipRateController" in a for a in args)  # top-k sets the rate; the controller refuses it
    nag = Cell("nag-random@0.25", "nag", 1, 0.01, None, 0.25, "random")
    args = nag.fit_arguments({"configs": [TINY], "flops": 1e12, "test_fraction": 0.5}, tmp_path)
    assert "--trainer.callbacks.target_rate=0.25" in args and args[args.index("--model.init_args.config.skip.rule") + 1] == "random"
    with pytest.raises(NagError, match="--peers takes router_mod"):
        study_module.run_isoflop(settings, [0.25], "step", 1e12, [], ["ngpt"])


def test_an_isoflop_rule_may_name_its_threshold_scope_and_capacity_mode(monkeypatch, tmp_path):
    """RULE+per_layer and RULE+capacity train the rule with per-sub-layer thresholds or in
    capacity mode: the per-token candidates of the default skip rule, each its own arm."""
    planned = {}
    monkeypatch.setattr(study_module, "plan_and_run", lambda kind, arms, grid, settings, budget, reference=None: planned.update(arms=arms))
    settings = StudySettings(str(tmp_path / "s"), [TINY], [], 4, [0.01], 1)
    study_module.run_isoflop(settings, [0.25], "step", 1e12, ["step+per_layer", "gate+capacity", "gate+per_layer+capacity"])
    assert [a[0] for a in planned["arms"]] == ["prenorm", "nag@0.25", "nag-step+per_layer@0.25",
                                              "nag-gate+capacity@0.25", "nag-gate+per_layer+capacity@0.25"]
    for rule, expected in (("step+per_layer", {"rule": "step", "threshold_scope": "per_layer"}),
                           ("gate+per_layer+capacity", {"rule": "gate", "threshold_scope": "per_layer", "mode": "capacity"})):
        args = Cell(f"nag-{rule}@0.25", "nag", 0, 0.01, None, 0.25, rule).fit_arguments(
            {"configs": [TINY], "flops": 1e12, "test_fraction": 0.5}, tmp_path)
        given = {a.rsplit(".", 1)[1]: args[i + 1] for i, a in enumerate(args) if a.startswith("--model.init_args.config.skip.")}
        assert given == expected
    for bad in ("step+sometimes", "step+capacity+capacity"):
        with pytest.raises(NagError, match=r"optionally with \+per_layer \+capacity"):
            study_module.run_isoflop(settings, [0.25], "step", 1e12, [bad])
    with pytest.raises(NagError, match="last_layers\\+per_layer contradicts itself; use last_layers alone"):
        study_module.run_isoflop(settings, [0.25], "step", 1e12, ["last_layers+per_layer"])


def _isoflop(arms):
    """An iso-FLOP study's settings: arms as (arm, strategy, rate, rule)."""
    return {"kind": "isoflop", "test_fraction": 0.5, "margin": 0.02,
            "arms": [{"arm": a, "strategy": s, "skip_rate": r, "skip_rule": rule} for a, s, r, rule in arms]}


def test_the_default_skip_rule_is_the_best_per_token_candidate_tested_against_controls_and_router():
    arms = [("prenorm", "prenorm", 0.0, None), ("nag@0", "nag", 0.0, None), ("nag@0.25", "nag", 0.25, "step"),
            ("nag-gate+per_layer@0.25", "nag", 0.25, "gate+per_layer"), ("nag-random@0.25", "nag", 0.25, "random"),
            ("nag-last_layers@0.25", "nag", 0.25, "last_layers"), ("router_mod@0.25", "router_mod", 0.25, None)]
    means = {"prenorm": 5.0, "nag@0": 4.8, "nag@0.25": 4.85, "nag-gate+per_layer@0.25": 4.80,
             "nag-random@0.25": 4.95, "nag-last_layers@0.25": 4.90, "router_mod@0.25": 4.801}
    noise = [0.004, -0.004, 0.002, -0.002]

    def cells(means, val_offset=None):
        """Main cells: the test losses ``means`` plus noise; validation losses 0.5 higher, or as given."""
        return [{"arm": arm, "seed": s, "sweep": False, "test_loss": mean + noise[s],
                 "val_loss": mean + 0.5 + (val_offset or {}).get(arm, 0.0) + noise[s]}
                for arm, mean in means.items() for s in range(4)]

    rows = cells(means) + [{"arm": "nag-random@0.25", "seed": 0, "sweep": True, "test_loss": 1.0, "val_loss": 1.0}]
    choices = rule_choice(_isoflop(arms), rows)
    assert {c["best"] for c in choices} == {"nag-gate+per_layer@0.25"}
    assert choices[0]["ranking"] == "nag-gate+per_layer@0.25 < nag@0.25"  # controls and the router are not candidates
    by_arm = {c["versus"]: c for c in choices}
    assert {arm: c["role"] for arm, c in by_arm.items()} == {
        "nag@0.25": "runner-up", "nag-random@0.25": "control", "nag-last_layers@0.25": "control",
        "router_mod@0.25": "learned router"}
    best = [means["nag-gate+per_layer@0.25"] + n for n in noise]
    expected = holm([welch(best, [means[arm] + n for n in noise])[3] for arm in by_arm])
    for (arm, entry), p_holm in zip(by_arm.items(), expected):
        assert entry["diff"] == pytest.approx(means["nag-gate+per_layer@0.25"] - means[arm])
        assert entry["p_holm"] == pytest.approx(p_holm)
    assert by_arm["nag-random@0.25"]["verdict"] == "different" and by_arm["router_mod@0.25"]["verdict"] == "equivalent"
    text = "\n".join(rule_choice_lines(choices))
    assert "The best, nag-gate+per_layer@0.25, against (on the reported loss" in text and "Finding" not in text
    # The choice is made on validation, the comparison on test: a rule best on validation is chosen
    # even where another is better on test (choosing on test would bias the test).
    chosen = rule_choice(_isoflop(arms), cells(means, val_offset={"nag-gate+per_layer@0.25": 0.1}))
    assert {c["best"] for c in chosen} == {"nag@0.25"}
    runner_up = next(c for c in chosen if c["role"] == "runner-up")
    assert runner_up["versus"] == "nag-gate+per_layer@0.25" and runner_up["diff"] == pytest.approx(0.05)
    # A control that beats every per-token rule is said in plain words.
    means["nag-random@0.25"] = 4.6
    text = "\n".join(rule_choice_lines(rule_choice(_isoflop(arms), cells(means))))
    assert "**Finding: nag-random@0.25 beat(s) every per-token rule at rate 0.25" in text
    assert rule_choice({"kind": "depth", "arms": []}, rows) == []


def test_a_depth_study_may_name_its_reference_arm(monkeypatch, tmp_path):
    """An ablation study compares every arm with NAG: the reference is recorded and the report uses it."""
    planned = {}
    monkeypatch.setattr(study_module, "plan_and_run", lambda kind, arms, grid, settings, budget, reference=None:
                        planned.update(reference=reference))
    monkeypatch.setattr(study_module, "budget_of", lambda settings: {})
    settings = StudySettings(str(tmp_path / "s"), [TINY], [], 2, [0.01], 1)
    study_module.run_depth(settings, ["prenorm", "nag", "nag_no_gate"], [4], reference="nag")
    assert planned["reference"] == "nag"
    with pytest.raises(NagError, match="--reference rezero is not one of --strategies"):
        study_module.run_depth(settings, ["prenorm", "nag"], [4], reference="rezero")
    study = _study(["prenorm", "nag", "nag_no_gate"], [4], seeds=2)
    assert reference_arm(study) == "prenorm" and reference_arm({**study, "reference": "nag"}) == "nag"
    rows = [_row(arm, 4, s, loss + 0.01 * s) for s in (0, 1) for arm, loss in
            (("prenorm", 3.2), ("nag", 3.0), ("nag_no_gate", 3.1))]
    summary = summarise({**study, "reference": "nag"}, rows)
    assert {s["arm"]: s.get("reference") for s in summary} == {"prenorm": "nag", "nag": None, "nag_no_gate": "nag"}


def test_a_one_depth_study_plots_every_seed_and_drops_the_depth_figures_of_an_earlier_report(tmp_path):
    # The ablations: one depth, so no "vs depth" line; a seed that stalls must show as its own dot.
    study = _study(["nag", "deepnorm"], [8], seeds=4)
    losses = {"nag": [4.0, 4.01, 4.02, 4.03], "deepnorm": [3.9, 4.1, 6.3, 6.4]}
    study["cells"] = [{"name": f"{arm}-{seed}", "arm": arm, "strategy": arm, "depth": 8, "seed": seed,
                       "learning_rate": 0.01, "sweep": False} for arm in losses for seed in range(4)]
    (tmp_path / "study.json").write_text(json.dumps(study))
    for arm, values in losses.items():
        for seed, loss in enumerate(values):
            (tmp_path / "cells" / f"{arm}-{seed}").mkdir(parents=True)
            (tmp_path / "cells" / f"{arm}-{seed}" / "result.json").write_text(json.dumps({"val_loss": loss}))
    (tmp_path / "val_loss_vs_depth.png").write_bytes(b"an earlier report's")
    report(tmp_path)
    assert not (tmp_path / "val_loss_vs_depth.png").exists() and not (tmp_path / "trend.csv").exists()
    assert (tmp_path / "loss_per_seed.png").stat().st_size > 0
    _, rows = load_cells(tmp_path)
    (figure,) = draw_figures(study, rows, summarise(study, rows)).values()
    dots = [line.get_xdata().tolist() for line in figure.axes[0].lines if line.get_marker() == "o"]
    assert dots == [losses["nag"], losses["deepnorm"]]  # every seed, in the arms' order
