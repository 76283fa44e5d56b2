"""``nag skip-sweep``: the accuracy-compute trade-off of a trained NAG checkpoint.

For each target rate: calibrate the skip thresholds on the first validation batch, then measure
validation loss, bits per byte, the realized skip rate and the executed forward FLOPs per token.
Prints a table and writes ``<checkpoint>.skip_sweep.csv`` and ``.png`` next to the checkpoint.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch

from nag_lightning.commands.runs import evaluate_batches, load_run, single_device_fabric, validation_batches
from nag_lightning.commands.typed import TypedCommand
from nag_lightning.errors import NagError
from nag_lightning.reporting import atomic_file, render_table, write_atomically

COLUMNS = ["target_rate", "realized_rate", "val_loss", "val_bpb", "forward_flops_per_token"]


@torch.no_grad()
def sweep(loaded, rates: list[float], max_batches: int | None) -> list[dict]:
    """One row per rate: calibrate on the first validation batch, then evaluate every batch, at the
    run's precision (``runs.evaluate_batches``, the loop ``nag validate``'s numbers agree with)."""
    policy = loaded.model.model.require_skipping("nag skip-sweep (a NAG checkpoint)")
    fabric = single_device_fabric(loaded.precision)
    model = fabric.setup_module(loaded.model)
    model.eval()
    batches = validation_batches(loaded, fabric, max_batches)
    rows = []
    for rate in rates:
        with fabric.autocast():
            _, output = model.loss(batches[0], return_output=True, calibrate=rate)
        policy.calibrate_from(output.record, rate)
        result = evaluate_batches(model, batches, fabric, loaded.datamodule.val_bytes_per_token)
        rows.append({"target_rate": rate, "realized_rate": result["skip_rate"], "val_loss": result["loss"],
                     "val_bpb": result["bpb"], "forward_flops_per_token": result["forward_flops_per_token"]})
    policy.set_thresholds(0.0)
    policy.set_capacity_shares(None)
    return rows


def write_outputs(rows: list[dict], stem: Path) -> list[Path]:
    """CSV, and a PNG where matplotlib is installed; each written to a temporary name, then renamed."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    written = [write_atomically(stem.with_name(stem.name + ".skip_sweep.csv"), text.getvalue())]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return written
    png_path = stem.with_name(stem.name + ".skip_sweep.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["forward_flops_per_token"] / 1e6 for r in rows]
    ax.plot(x, [r["val_loss"] for r in rows], marker="o")
    for r, xi in zip(rows, x):
        ax.annotate(f"{100 * r['realized_rate']:.0f}%", (xi, r["val_loss"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("executed forward MFLOPs per token")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"skip-sweep: {stem.name}")
    fig.tight_layout()
    try:
        with atomic_file(png_path, "wb") as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)
    written.append(png_path)
    return written


def skip_sweep(ckpt_path: str, rates: list[float] = [0.0, 0.1, 0.2, 0.3, 0.4], batches: int | None = None,  # noqa: B006
               data_dir: str | None = None, config: str | None = None) -> list[dict]:
    """The accuracy-compute trade-off of a trained NAG checkpoint.

    Args:
        ckpt_path: a NAG checkpoint (single file).
        rates: target skip rates in [0, 1).
        batches: validation batches to use (default: all).
        data_dir: the dataset folder, if not where the run found it.
        config: take data and precision from this run config.yaml instead of the checkpoint.
    """
    bad = [r for r in rates if not 0.0 <= r < 1.0]
    if bad:
        raise NagError(f"nag skip-sweep: --rates must lie in [0, 1); got {bad}.")
    loaded = load_run(ckpt_path, config, data_dir)
    rows = sweep(loaded, sorted(rates), batches)
    print(render_table(["target", "realized", "val_loss", "val_bpb", "fwd MFLOP/token"],
                       [[f"{r['target_rate']:.3f}", f"{r['realized_rate']:.3f}", f"{r['val_loss']:.4f}",
                         f"{r['val_bpb']:.4f}", f"{r['forward_flops_per_token'] / 1e6:.3f}"] for r in rows]))
    for path in write_outputs(rows, Path(ckpt_path).with_suffix("")):
        print(f"wrote {path}")
    return rows


COMMAND = TypedCommand(skip_sweep)
add_arguments, normalise = COMMAND.add_to, COMMAND.normalise


def run(args) -> None:
    COMMAND(args)
