"""``nag skip-sweep``: the accuracy-compute trade-off of a trained NAG checkpoint.

For each target rate: calibrate the skip thresholds on the first validation batch, then measure
validation loss, bits per byte, the realized skip rate and the executed forward FLOPs per token.
Prints a table and writes ``<checkpoint>.skip_sweep.csv`` and ``.png`` next to the checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from pathlib import Path

import torch
import yaml

from nag_lightning.errors import NagError

COLUMNS = ["target_rate", "realized_rate", "val_loss", "val_bpb", "forward_flops_per_token"]


def load(ckpt_path: Path, config_path: Path | None):
    from nag_lightning.data import TokenShardDataModule
    from nag_lightning.lit_module import LanguageModel

    if not ckpt_path.is_file():
        raise NagError(f"nag skip-sweep: checkpoint {ckpt_path} does not exist (a single-file checkpoint is needed; "
                       "consolidate an FSDP2 folder first, see the README).")
    config_path = config_path or ckpt_path.parent.parent / "config.yaml"
    if not config_path.is_file():
        raise NagError(f"nag skip-sweep: no run config at {config_path}; pass --config RUN/config.yaml.")
    model = LanguageModel.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=False)
    if not hasattr(model.model.residual, "start_calibration"):
        raise NagError(f"nag skip-sweep: the checkpoint's residual strategy is {type(model.model.residual).__name__}, "
                       "which has no gate to skip sub-layers with; skip-sweep needs a NAG checkpoint.")
    data_args = yaml.safe_load(config_path.read_text())["data"]["init_args"]
    data = TokenShardDataModule(**data_args)
    data.setup("validate")
    return model, data


@torch.no_grad()
def sweep(model, data, rates: list[float], max_batches: int | None) -> list[dict]:
    model.eval()
    residual = model.model.residual
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    batches = []
    for index, batch in enumerate(data.val_dataloader()):
        if max_batches is not None and index >= max_batches:
            break
        batches.append(batch.to(device))
    rows = []
    for rate in rates:
        residual.start_calibration(rate)
        model.loss(batches[0])
        residual.finish_calibration()
        losses, skipped, flops, tokens = [], [], 0.0, 0
        for batch in batches:
            losses.append(model.loss(batch).item())
            batch_size, seq = batch.shape[0], batch.shape[1] - 1
            skipped.append(1.0 - residual.executed_fraction.mean().item() if residual.skipping else 0.0)
            flops += model.model.forward_flops(batch_size, seq)[0].item()
            tokens += batch_size * seq
        loss = sum(losses) / len(losses)
        rows.append({"target_rate": rate, "realized_rate": sum(skipped) / len(skipped), "val_loss": loss,
                     "val_bpb": loss / math.log(2) / data.val_bytes_per_token, "forward_flops_per_token": flops / tokens})
    residual.set_skip_thresholds(0.0)
    return rows


def write_outputs(rows: list[dict], stem: Path) -> list[Path]:
    """CSV, and a PNG where matplotlib is installed; each written to a temporary name, then renamed."""
    written = []
    csv_path = stem.with_name(stem.name + ".skip_sweep.csv")
    tmp = csv_path.with_name(f".{csv_path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, csv_path)
    written.append(csv_path)
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
    tmp = png_path.with_name(f".{png_path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
    written.append(png_path)
    return written


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="nag skip-sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="a NAG checkpoint (single file)")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4],
                        help="target skip rates in [0, 1) (default 0 0.1 0.2 0.3 0.4)")
    parser.add_argument("--config", default=None, help="the run's config (default: RUN/config.yaml next to checkpoints/)")
    parser.add_argument("--batches", type=int, default=None, help="validation batches to use (default: all)")
    args = parser.parse_args(argv)
    bad = [r for r in args.rates if not 0.0 <= r < 1.0]
    if bad:
        raise NagError(f"nag skip-sweep: --rates must lie in [0, 1); got {bad}.")
    model, data = load(Path(args.ckpt_path), Path(args.config) if args.config else None)
    rows = sweep(model, data, sorted(args.rates), args.batches)
    header = f"{'target':>7}  {'realized':>8}  {'val_loss':>8}  {'val_bpb':>7}  {'fwd MFLOP/token':>15}"
    print(header)
    for r in rows:
        print(f"{r['target_rate']:>7.3f}  {r['realized_rate']:>8.3f}  {r['val_loss']:>8.4f}  {r['val_bpb']:>7.4f}  "
              f"{r['forward_flops_per_token'] / 1e6:>15.3f}")
    ckpt = Path(args.ckpt_path)
    for path in write_outputs(rows, ckpt.with_suffix("")):
        print(f"wrote {path}")
