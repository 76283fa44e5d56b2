"""``nag bench``: time training steps (forward, backward, optimizer) of configs in one process.

Each positional argument is one configuration, parsed by the same LightningCLI parser as
``nag fit`` (``a.yaml+b.yaml`` composes files like repeated ``--config``). Steps run on synthetic
tokens with the config's model, micro-batch, context length and precision, through Fabric.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from nag_lightning.errors import NagError
from nag_lightning.reporting import render_table, write_atomically
from nag_lightning.runs import instantiate


def calibrate_skipping(model, batch: torch.Tensor, rate: float, spec: str) -> None:
    residual = model.model.residual
    if not residual.can_skip:
        raise NagError(f"nag bench --skip_rate: {spec} uses {type(residual).__name__}, which has no gate to skip "
                       "sub-layers with; skipping needs the NAG residual strategy.")
    with torch.no_grad(), residual.calibrate(rate):
        model.loss(batch)


def time_training_steps(model, batch_size: int, context_length: int, precision: str, steps: int,
                        warmup: int, seed: int = 0, skip_rate: float = 0.0, forward_only: bool = False,
                        spec: str = "") -> tuple[list[float], float]:
    """Milliseconds of each of ``steps`` timed training steps (or forward passes) after ``warmup``
    untimed ones, and the realized skip rate (0 without skipping)."""
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="auto", devices=1, precision=precision)
    model.configure_model()  # compilation and activation checkpointing, as under the Trainer
    optimizer = model.build_optimizer()
    model, optimizer = fabric.setup(model, optimizer)
    model.train()
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    batches = [torch.randint(vocab, (batch_size, context_length + 1), generator=generator) for _ in range(4)]
    batches = [fabric.to_device(b) for b in batches]
    sync = torch.cuda.synchronize if fabric.device.type == "cuda" else (lambda: None)
    residual = model.model.residual
    residual.set_training_step(10**9)  # steady state: past any warm-up of the strategy (NAG's alpha)
    if skip_rate > 0:
        with fabric.autocast():
            calibrate_skipping(model, batches[0], skip_rate, spec)
    times, executed = [], []
    for step in range(warmup + steps):
        sync()
        started = time.perf_counter()
        with fabric.autocast(), torch.set_grad_enabled(not forward_only):
            # `loss` is not `forward`, so Fabric's module wrapper does not autocast it by itself.
            loss = model.loss(batches[step % len(batches)])
        if not forward_only:
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync()
        if step >= warmup:
            times.append((time.perf_counter() - started) * 1e3)
            if skip_rate > 0:
                executed.append(residual.skip_stats(batch_size, context_length).skip_rate.item())
    return times, sum(executed) / len(executed) if executed else 0.0


def benchmark(specs: list[str], steps: int, warmup: int, skip_rate: float = 0.0, forward_only: bool = False) -> list[dict]:
    rows = []
    for spec in specs:
        spec, _, rate = spec.partition("@")  # config.yaml@0.25: skip 25% of (token, sub-layer) pairs
        rate = float(rate) if rate else skip_rate
        loaded = instantiate(spec.split("+"))
        model, data, precision = loaded.model, loaded.datamodule, loaded.precision
        times, realized = time_training_steps(model, data.batch_size, data.context_length, precision, steps, warmup,
                                              skip_rate=rate, forward_only=forward_only, spec=spec)
        median = statistics.median(times)
        q = statistics.quantiles(times, n=4) if len(times) >= 2 else [median, median, median]
        rows.append({
            "config": spec + (f"@{rate:g}" if rate else ""),
            "params": sum(p.numel() for p in model.parameters()),
            "backend": model.config.kernels + ("+compile" if model.hparams.compile else ""),
            "precision": precision,
            "mode": "forward" if forward_only else "train",
            "skip_rate": realized,
            "batch_tokens": data.batch_size * data.context_length,
            "ms_per_step_median": median,
            "ms_per_step_iqr": q[2] - q[0],
            "tokens_per_sec": data.batch_size * data.context_length / (median / 1e3),
        })
        rows[-1]["ratio"] = median / rows[0]["ms_per_step_median"]
        del model
    return rows


def format_table(rows: list[dict]) -> str:
    header = ["config", "params", "backend", "precision", "mode", "skip_rate", "ms/step (median ± IQR/2)", "tokens/s",
              "ratio"]
    lines = [[r["config"], f"{r['params'] / 1e6:.2f}M", r["backend"], r["precision"], r["mode"], f"{r['skip_rate']:.3f}",
              f"{r['ms_per_step_median']:.1f} ± {r['ms_per_step_iqr'] / 2:.1f}",
              f"{r['tokens_per_sec']:,.0f}", f"{r['ratio']:.3f}"] for r in rows]
    return render_table(header, lines)


def add_arguments(parser) -> None:
    """``nag bench``'s options (a jsonargparse parser; see ``nag_lightning/cli.py``)."""
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("configs", nargs="*", type=str,
                        help="config files; a.yaml+b.yaml composes files; CONFIG@RATE skips RATE of (token, sub-layer) pairs")
    parser.add_argument("--kernels", action="store_true",
                        help="instead of configs, time the NAG update kernels (eager, compiled, Triton) at training sizes")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per config")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per config")
    parser.add_argument("--json", type=str | None, default=None, help="also write the rows as a JSON list to this path")
    parser.add_argument("--skip_rate", type=float, default=0.0,
                        help="calibrate NAG skip thresholds to skip this fraction of (token, sub-layer) pairs; "
                             "per config: CONFIG@RATE")
    parser.add_argument("--forward", action="store_true", help="time forward passes without gradients (inference)")


def run(args) -> None:
    if args.steps < 1 or args.warmup < 0:
        raise NagError("nag bench: --steps must be >= 1 and --warmup >= 0.")
    if args.kernels:
        from nag_lightning.kernel_bench import benchmark_kernels, format_kernel_table

        rows = benchmark_kernels(args.steps, args.warmup)
        table = format_kernel_table(rows)
    elif not args.configs:
        raise NagError("nag bench: give one or more config files, or --kernels.")
    else:
        if not 0.0 <= args.skip_rate < 1.0:
            raise NagError(f"nag bench: --skip_rate must be in [0, 1), got {args.skip_rate}.")
        rows = benchmark(args.configs, args.steps, args.warmup, args.skip_rate, args.forward)
        table = format_table(rows)
    print(table)
    if args.json:
        write_atomically(args.json, json.dumps(rows, indent=2))
