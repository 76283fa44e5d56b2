"""``nag inspect``: attention sinks, massive activations and kurtosis of a checkpoint, per sub-layer.

The measures of ``model/inspection.py`` on validation batches (averaged over them), written next
to the checkpoint as ``<checkpoint>.inspect.csv`` (one row per sub-layer), ``.inspect_weights.csv``
(every weight matrix), ``.inspect.json`` and ``.inspect.png``; ``--compare B`` measures a second
checkpoint on its own validation data and draws both in ``<checkpoint>.inspect_compare.png``;
``--quantize int8`` reports the validation loss after int8 weight quantization (torchao).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import statistics
import re
from pathlib import Path

import torch

from nag_lightning.commands.runs import evaluate_batches, load_run, single_device_fabric, validation_batches
from nag_lightning.commands.typed import TypedCommand
from nag_lightning.errors import NagError
from nag_lightning.model.inspection import inspect_model, weight_kurtosis, weight_tags
from nag_lightning.reporting import atomic_file, render_table, write_atomically

LAYER_COLUMNS = ["layer", "block", "sublayer", "sink_score", "residual_max_over_median", "output_max_over_median",
                 "residual_kurtosis", "output_kurtosis", "weight_kurtosis"]
# inspection tag (without the layer) -> column
TAG_COLUMNS = {"inspect/sink_score": "sink_score", "inspect/massive/residual": "residual_max_over_median",
               "inspect/massive/output": "output_max_over_median", "inspect/kurtosis/residual": "residual_kurtosis",
               "inspect/kurtosis/output": "output_kurtosis", "inspect/kurtosis/weight": "weight_kurtosis"}


@torch.no_grad()
def measure(loaded, batch_count: int, quantize: str | None, quantize_activations: bool) -> dict:
    """Layer rows, weight rows and losses of one checkpoint, at the run's precision."""
    fabric = single_device_fabric(loaded.precision)
    model = fabric.setup_module(loaded.model)
    model.eval()
    batches = validation_batches(loaded, fabric, batch_count)
    bytes_per_token = loaded.datamodule.val_bytes_per_token
    measured: dict[str, list[float]] = {}
    for batch in batches:
        with fabric.autocast():
            for tag, value in inspect_model(model.model, batch[:, :-1], weights=False).items():
                measured.setdefault(tag, []).append(value.item())
    # A sub-layer's output measures are NaN on a batch where no token executed it: left out of its mean.
    totals = {tag: statistics.fmean(finite) if (finite := [v for v in values if not math.isnan(v)]) else math.nan
              for tag, values in measured.items()}
    kurtosis = weight_kurtosis(model.model)
    totals.update({tag: value.item() for tag, value in weight_tags(model.model, kurtosis).items()})
    result = {"layers": layer_rows(totals, 2 * loaded.model.config.n_layers),
              "weights": [{"parameter": name, "kurtosis": value.item()} for name, value in kurtosis.items()],
              "val_loss": evaluate_batches(model, batches, fabric, bytes_per_token)["loss"], "batches": len(batches),
              "tokens": sum(b.shape[0] * (b.shape[1] - 1) for b in batches),
              "strategy": type(loaded.model.model.residual).__name__}
    if quantize is not None:
        quantized = quantize_int8(loaded.model, quantize_activations)
        result["quantization"] = {"scheme": "int8 weights per channel" + (
            ", int8 activations per token (dynamic)" if quantize_activations else ""),
            "quantized_matrices": "every Linear in the blocks (embedding and head stay in float)",
            "val_loss": evaluate_batches(fabric.setup_module(quantized), batches, fabric, bytes_per_token)["loss"]}
        result["quantization"]["val_loss_change"] = result["quantization"]["val_loss"] - result["val_loss"]
    return result


def layer_rows(tags: dict[str, float], n_sublayers: int) -> list[dict]:
    rows = [{"layer": layer, "block": (layer + 1) // 2, "sublayer": "attention" if layer % 2 else "mlp",
             **dict.fromkeys(TAG_COLUMNS.values(), None)} for layer in range(1, n_sublayers + 1)]
    for tag, value in tags.items():
        match = re.fullmatch(r"(.+)/layer_(\d+)", tag)
        if match and match.group(1) in TAG_COLUMNS:
            rows[int(match.group(2)) - 1][TAG_COLUMNS[match.group(1)]] = value
    return rows


def quantize_int8(model, activations: bool):
    """A copy of ``model`` (a ``LanguageModel``) whose block matrices torchao quantized to int8 per
    output channel (weight-only, or with dynamic per-token int8 activations)."""
    try:
        quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
        levels = [logger.level for logger in quiet]
        for logger in quiet:  # torchao reports its GPU-only extensions that do not load here, at import
            logger.setLevel(logging.ERROR)
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
        finally:
            for logger, level in zip(quiet, levels):
                logger.setLevel(level)
    except ImportError:
        raise NagError("--quantize needs torchao: pip install torchao (pip install 'nag-lightning[inspect]').") from None
    quantized = copy.deepcopy(model)
    config = Int8DynamicActivationInt8WeightConfig() if activations else Int8WeightOnlyConfig()
    quantize_(quantized.model, config,
              filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) and name.startswith("blocks."))
    return quantized


def as_csv(rows: list[dict], columns: list[str]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def write_outputs(result: dict, stem: Path) -> list[Path]:
    written = [write_atomically(stem.with_name(stem.name + ".inspect.csv"), as_csv(result["layers"], LAYER_COLUMNS)),
               write_atomically(stem.with_name(stem.name + ".inspect_weights.csv"),
                                as_csv(result["weights"], ["parameter", "kurtosis"])),
               write_atomically(stem.with_name(stem.name + ".inspect.json"), json.dumps(result, indent=2))]
    figure = draw({label(result, stem): result["layers"]}, stem.with_name(stem.name + ".inspect.png"))
    return written + ([figure] if figure else [])


def label(result: dict, stem: Path) -> str:
    """The strategy and the run folder (``RUN_NAME/version_N`` of ``.../checkpoints/last``)."""
    run = stem.parent.parent
    return f"{result['strategy']} ({run.parent.name}/{run.name})"


PANELS = [("sink_score", None, "attention on the first token", "attention sink score"),
          ("residual_max_over_median", "output_max_over_median", "max |x| / median |x|",
           "massive activations (solid: residual, dashed: sub-layer output)"),
          ("residual_kurtosis", "output_kurtosis", "excess kurtosis",
           "activation kurtosis (solid: residual, dashed: sub-layer output)"),
          ("weight_kurtosis", None, "excess kurtosis", "weight kurtosis (largest matrix of the sub-layer)")]


def draw(runs: dict[str, list[dict]], path: Path) -> Path | None:
    """One panel per measure against the sub-layer number, one colour per run; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure (pip install matplotlib)")
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (solid, dashed, ylabel, title) in zip(axes.flat, PANELS):
        for index, (name, rows) in enumerate(runs.items()):
            colour = f"C{index}"
            for column, style in ((solid, "-"), (dashed, "--")):
                points = [(r["layer"], r[column]) for r in rows if column and r[column] is not None]
                if points:
                    ax.plot(*zip(*points), style, marker="o", markersize=3, color=colour,
                            label=name if style == "-" else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("sub-layer (odd: attention, even: MLP)")
        ax.set_ylabel(ylabel)
    axes.flat[1].set_yscale("log")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_file(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
    return path


def summary_line(rows: list[dict]) -> list[str]:
    def largest(column):
        values = [r[column] for r in rows if r[column] is not None]
        return f"{max(values):.3g}" if values else "-"

    sinks = [r["sink_score"] for r in rows if r["sink_score"] is not None]
    return [f"{sum(sinks) / len(sinks):.3f}" if sinks else "-", largest("residual_max_over_median"),
            largest("output_max_over_median"), largest("residual_kurtosis"), largest("output_kurtosis"),
            largest("weight_kurtosis")]


def inspect(ckpt_path: str, compare: str | None = None, batches: int = 4, quantize: str | None = None,
            quantize_activations: bool = False, data_dir: str | None = None) -> None:
    """Attention sinks, massive activations and kurtosis of a checkpoint, per sub-layer.

    Args:
        ckpt_path: a checkpoint (single file).
        compare: a second checkpoint (e.g. pre-norm vs NAG), measured on its own validation data.
        batches: validation batches to average over.
        quantize: 'int8': also report the validation loss with int8 per-channel weights (torchao).
        quantize_activations: with --quantize int8: also quantize activations per token, dynamically.
        data_dir: the dataset folder of --ckpt_path, if not where the run found it.
    """
    if batches < 1:
        raise NagError(f"nag inspect: --batches must be at least 1, got {batches}.")
    if quantize not in (None, "int8"):
        raise NagError(f"nag inspect: --quantize supports 'int8', got {quantize!r}.")
    if quantize_activations and quantize is None:
        raise NagError("nag inspect: --quantize_activations needs --quantize int8.")
    paths = [Path(ckpt_path)] + ([Path(compare)] if compare else [])
    results = {}
    for index, path in enumerate(paths):
        loaded = load_run(path, data_dir=data_dir if index == 0 else None)
        result = measure(loaded, batches, quantize, quantize_activations)
        for written in write_outputs(result, path.with_suffix("")):
            print(f"wrote {written}")
        name = label(result, path.with_suffix(""))
        results[name if name not in results else f"{name} #{index + 1}"] = result
    header = ["run", "val_loss", "mean sink", "max resid max/med", "max out max/med", "max resid kurt",
              "max out kurt", "max weight kurt"]
    lines = [[name, f"{r['val_loss']:.4f}", *summary_line(r["layers"])] for name, r in results.items()]
    print(render_table(header, lines))
    quantized = [(name, r["quantization"]) for name, r in results.items() if "quantization" in r]
    if quantized:
        print(render_table(["run", "scheme", "val_loss float", "val_loss int8", "change"],
                           [[name, q["scheme"], f"{results[name]['val_loss']:.4f}", f"{q['val_loss']:.4f}",
                             f"{q['val_loss_change']:+.5f}"] for name, q in quantized]))
    if len(results) > 1:
        stem = paths[0].with_suffix("")
        figure = draw({name: r["layers"] for name, r in results.items()},
                      stem.with_name(stem.name + ".inspect_compare.png"))
        if figure:
            print(f"wrote {figure}")


COMMAND = TypedCommand(inspect)
add_arguments, normalise = COMMAND.add_to, COMMAND.normalise


def run(args) -> None:
    COMMAND(args)
