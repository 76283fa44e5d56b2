"""Inside the model: the inspection measures against their definitions (float64), `nag inspect`
through the CLI, and what a real TensorBoard server serves of a run (tags, layout, heat map, HPARAMS)."""

import csv
import json
import math
import re
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import scipy.stats
import torch

from conftest import REPO, tiny_model_config
from nag_lightning.model import Transformer
from nag_lightning.model.inspection import excess_kurtosis, inspect_model, max_over_median, weight_kurtosis
from nag_lightning.model.residual import NAG, PreNorm
from test_cli import TINY, run_main


def test_kurtosis_and_max_over_median_match_their_definitions():
    generator = np.random.default_rng(0)
    for sample in (generator.normal(size=4000), generator.laplace(size=(40, 100)), generator.standard_t(5, 999)):
        x = torch.from_numpy(sample)
        assert excess_kurtosis(x).item() == pytest.approx(scipy.stats.kurtosis(sample, axis=None), rel=1e-10)
        assert excess_kurtosis(x.float()).item() == pytest.approx(scipy.stats.kurtosis(sample, axis=None), rel=1e-4,
                                                                 abs=1e-5)  # float32 weights and activations
        assert max_over_median(x).item() == pytest.approx(np.abs(sample).max() / np.quantile(np.abs(sample), 0.5, method="lower"), rel=1e-6)
    assert abs(excess_kurtosis(torch.from_numpy(generator.normal(size=200_000))).item()) < 0.05
    assert excess_kurtosis(torch.from_numpy(generator.laplace(size=200_000))).item() == pytest.approx(3.0, abs=0.15)


def test_sink_score_is_the_softmax_weight_on_the_first_token():
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(residual=PreNorm())).double()
    attention = model.blocks[1].attn
    x = torch.randn(3, 32, 32, dtype=torch.float64)
    cos, sin = model.rope_cos.double(), model.rope_sin.double()
    q = attention.queries(x, cos, sin)  # (B, 4 heads, T, h)
    k = attention.keys_values(x, cos, sin)[0].repeat_interleave(2, dim=1)  # 2 key-value heads, shared by pairs
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(32, 32, dtype=torch.bool).triu(1), float("-inf"))
    expected = scores.softmax(dim=-1)[..., 0]
    torch.testing.assert_close(attention.first_token_attention(x, cos, sin), expected, rtol=1e-12, atol=1e-12)
    assert torch.all(expected[..., 0] == 1)  # the first query sees only the first key: left out of the score

    tokens = torch.randint(0, 512, (2, 32))
    captured = {}
    hook = attention.register_forward_hook(lambda m, args, out: captured.__setitem__("x", args[0]))  # None
    stats = inspect_model(model, tokens)
    hook.remove()
    sink = attention.first_token_attention(captured["x"], cos, sin)[..., 1:].mean()
    assert stats["inspect/sink_score/layer_03"].item() == pytest.approx(sink.item(), rel=1e-6)
    assert "inspect/sink_score/layer_04" not in stats  # MLP sub-layers have no attention


def test_a_planted_massive_activation_and_heavy_tailed_weights_show_up():
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(residual=PreNorm())).double()
    tokens = torch.randint(0, 512, (2, 32))
    before = inspect_model(model, tokens)
    with torch.no_grad():
        model.embed.weight[tokens[0, 5], 7] = 1000.0  # one huge channel of one token, carried by the residual
        laplace = torch.distributions.Laplace(0.0, 0.02).sample(model.blocks[1].mlp.down_proj.weight.shape)
        model.blocks[1].mlp.down_proj.weight.copy_(laplace)
    after = inspect_model(model, tokens)
    for layer in ("01", "02", "03", "04"):
        assert before[f"inspect/massive/residual/layer_{layer}"] < 20
        assert after[f"inspect/massive/residual/layer_{layer}"] > 1000
        assert after[f"inspect/kurtosis/residual/layer_{layer}"] > 100
    assert abs(before["inspect/kurtosis/weight/layer_04"].item()) < 0.5
    assert after["inspect/kurtosis/weight/layer_04"].item() == pytest.approx(3.0, abs=0.6)  # Laplace: 3
    assert after["inspect/kurtosis/weight/layer_04"] == weight_kurtosis(model)["blocks.1.mlp.down_proj.weight"].float()
    assert after["inspect/kurtosis/weight/layer_03"] == before["inspect/kurtosis/weight/layer_03"]


def test_inspection_changes_nothing_runs_eagerly_and_skips_skipped_tokens():
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(residual=NAG(threshold_scope="per_layer"))).double()
    tokens = torch.randint(0, 512, (2, 32))
    expected = model(tokens)
    for block in model.blocks:  # a compiled sub-layer would hide the hooks: inspection must not call it
        block.sublayer = lambda *args, **kwargs: pytest.fail("inspection ran the compiled sub-layer")
    model.train()
    stats = inspect_model(model, tokens)
    assert model.training and all(torch.isfinite(v) for v in stats.values())
    assert not any(tag.startswith("nag/") for tag in stats)  # only inspection measures
    for block in model.blocks:
        del block.sublayer
    model.eval()
    torch.testing.assert_close(model(tokens), expected, rtol=0, atol=0)

    # Skipping about half the tokens: the output measures cover the executed tokens only, as if the
    # skipped ones had not been there ("mask" computes every token's output, the oracle).
    policy = model.skip_policy
    policy.calibrate_from(model(tokens, return_record=True, calibrate=0.5).record, 0.5)
    executed = {}
    hook = model.blocks[1].mlp.register_forward_hook(lambda m, args, out: executed.update(args=args, out=out))
    gathered = inspect_model(model, tokens)
    hook.remove()
    executed_tokens = model(tokens, return_record=True).record.stats().executed_tokens[3].item()  # block 2's MLP
    assert 0 < executed_tokens < 64
    packing = executed["args"][1]  # the MLP's output is the packed rows, padded
    assert executed["out"].shape[0] > executed_tokens
    kept = executed["out"][packing.scatter < 64]
    assert kept.shape[0] == executed_tokens  # the packing's padding rows are not outputs
    assert gathered["inspect/kurtosis/output/layer_04"].item() == pytest.approx(excess_kurtosis(kept).item(), rel=1e-6)
    policy.set_thresholds(1e9)  # every token skips every sub-layer
    nothing = inspect_model(model, tokens)
    assert torch.isnan(nothing["inspect/massive/output/layer_02"]) and torch.isnan(nothing["inspect/kurtosis/output/layer_03"])
    assert torch.isfinite(nothing["inspect/massive/residual/layer_04"])  # the same tags, so ranks log alike
    assert nothing.keys() == gathered.keys()


@pytest.fixture(scope="module")
def two_runs(tiny_data, tmp_path_factory):
    """A pre-norm run without the inspection tags and a NAG run that skips 25% with the heat map."""
    save_dir = tmp_path_factory.mktemp("runs")
    common = ["--data.init_args.data_dir", str(tiny_data), "--trainer.logger.init_args.save_dir", str(save_dir),
              "--trainer.max_steps", "20", "--trainer.enable_progress_bar", "false"]
    runs = {}
    for name, extra in (("prenorm", ["--model.init_args.inspect", "false"]),
                        ("nag", ["--trainer.callbacks+=nag_lightning.lightning.callbacks.SkipRateController",
                                 "--trainer.callbacks.target_rate=0.25",
                                 "--trainer.callbacks+=nag_lightning.lightning.callbacks.SkipStatsLogger"])):
        try:
            from nag_lightning.commands.main import main

            main(["fit", "--config", TINY, "--config", str(REPO / f"configs/residual/{name}.yaml"), *common, *extra])
        except SystemExit as exit_:
            assert not exit_.code
        runs[name] = save_dir / name / "version_0"
    return save_dir, runs


def test_nag_inspect_writes_tables_figures_and_int8_loss(two_runs, capsys):
    _, runs = two_runs
    a, b = (runs[name] / "checkpoints" / "last.ckpt" for name in ("prenorm", "nag"))
    code, printed, err = run_main(["inspect", "--ckpt_path", str(a), "--compare", str(b), "--batches", "2",
                                   "--quantize", "int8"], capsys)
    assert code == 0, err
    for run in (a, b):
        rows = list(csv.DictReader(open(run.with_name("last.inspect.csv"))))
        assert [int(r["layer"]) for r in rows] == [1, 2, 3, 4]
        assert [r["sublayer"] for r in rows] == ["attention", "mlp", "attention", "mlp"]
        assert rows[0]["sink_score"] and not rows[1]["sink_score"]
        assert all(float(r["residual_max_over_median"]) > 1 for r in rows)
        weights = list(csv.DictReader(open(run.with_name("last.inspect_weights.csv"))))
        assert {"blocks.0.attn.q_proj.weight", "blocks.1.mlp.down_proj.weight", "embed.weight"} <= \
            {w["parameter"] for w in weights}
        summary = json.loads(run.with_name("last.inspect.json").read_text())
        quantized = summary["quantization"]
        assert math.isfinite(summary["val_loss"]) and quantized["val_loss"] != summary["val_loss"]
        assert abs(quantized["val_loss_change"]) < 0.05  # int8 per channel barely moves a healthy model
        assert run.with_name("last.inspect.png").stat().st_size > 0
    assert a.with_name("last.inspect_compare.png").stat().st_size > 0
    assert "PreNorm (prenorm/version_0)" in printed and "NAG (nag/version_0)" in printed
    assert "val_loss int8" in printed

    for bad, message in ((["--quantize", "int4"], "supports 'int8'"), (["--batches", "0"], "at least 1"),
                         (["--quantize_activations", "true"], "needs --quantize int8")):
        code, _, err = run_main(["inspect", "--ckpt_path", str(a), *bad], capsys)
        assert code == 2 and message in err, err


def get_json(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def test_a_real_tensorboard_server_serves_the_tags_layout_heatmap_and_hparams(two_runs):
    save_dir, runs = two_runs
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(save_dir), "--host",
                               "127.0.0.1", "--port", "0", "--load_fast", "false", "--reload_interval", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        address = None
        for line in server.stdout:  # "TensorBoard 2.x at http://127.0.0.1:PORT/ (Press CTRL+C to quit)"
            found = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            if found:
                address = found.group(1)
                break
        assert address, "TensorBoard did not start"
        deadline = time.monotonic() + 120  # the first load of the event files runs in the background
        while True:
            tags = get_json(f"{address}/data/plugin/scalars/tags")
            if {"nag/version_0", "prenorm/version_0"} <= tags.keys() and "val/loss" in tags["nag/version_0"]:
                break
            assert time.monotonic() < deadline, f"the runs never appeared: {list(tags)}"
            time.sleep(0.5)
        nag, prenorm = tags["nag/version_0"], tags["prenorm/version_0"]
        for tag in ("train/loss", "val/loss", "residual/rms/layer_01", "mod/skip_rate/layer_04",
                    "inspect/sink_score/layer_01", "inspect/sink_score/layer_03", "inspect/massive/residual/layer_04",
                    "inspect/massive/output/layer_02", "inspect/kurtosis/output/layer_01",
                    "inspect/kurtosis/residual/layer_02", "inspect/kurtosis/weight/layer_04"):
            assert tag in nag, tag
        assert "train/loss" in prenorm and not any(t.startswith("inspect/") for t in prenorm)  # inspect: false
        assert not {"epoch", "hp_metric"} & (nag.keys() | prenorm.keys())

        layout = get_json(f"{address}/data/plugin/custom_scalars/layout")
        charts = {chart["title"]: chart["multiline"]["tag"] for category in layout["category"]
                  for chart in category["chart"]}
        assert layout["category"][0]["title"] == "1. training"
        assert charts["loss (train and validation)"] == ["train/loss", "val/loss"]
        for title in ("residual RMS by layer", "relative update by layer", "skip rate by layer",
                      "attention sink score by layer"):
            pattern = charts[title][0]
            assert sum(bool(re.fullmatch(pattern, tag)) for tag in nag) == (2 if "sink" in title else 4), title

        images = get_json(f"{address}/data/plugin/images/tags")
        assert "mod/skip_heatmap" in images["nag/version_0"]

        experiment = get_json(f"{address}/data/plugin/hparams/experiment", {"experimentName": ""})
        hparams = {h["name"] for h in experiment["hparamInfos"]}
        assert {"world_size", "accumulate_grad_batches", "tokens_per_optimizer_step", "learning_rate",
                "config/n_layers", "config/residual/class_path"} <= hparams
        assert not any(name.startswith("_") or "/_" in name for name in hparams)
        assert {m["name"]["tag"] for m in experiment["metricInfos"]} >= {"val/loss", "val/bpb", "mod/skip_rate"}
        groups = get_json(f"{address}/data/plugin/hparams/session_groups",
                          {"experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"],
                           "colParams": [], "startIndex": 0, "sliceSize": 10})["sessionGroups"]
        final = {group["name"]: {m["name"]["tag"]: m["value"] for m in group["metricValues"]} for group in groups}
        result = json.loads((runs["nag"] / "result.json").read_text())
        assert final["nag/version_0"]["val/loss"] == pytest.approx(result["val_loss"], rel=1e-6)
        assert final["nag/version_0"]["mod/skip_rate"] > 0
        # How many sub-layers each validation token ran, and its spread (the per-token adaptivity).
        histogram = result["depth_histogram"]
        depths = range(len(histogram))
        mean = sum(k * count for k, count in zip(depths, histogram)) / sum(histogram)
        spread = (sum(count * (k - mean) ** 2 for k, count in zip(depths, histogram)) / sum(histogram)) ** 0.5
        assert result["executed_sublayers_std"] == pytest.approx(spread, rel=1e-6) and spread > 0
        assert 1 - mean / (len(histogram) - 1) == pytest.approx(result["skip_rate"], abs=1e-6)
    finally:
        server.kill()
        server.wait()
