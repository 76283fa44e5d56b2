"""``nag bench``: time training steps, generation, the NAG kernels, data loading, or the standard suite.

``nag bench train|generate|kernels|data|suite``, each mode a typed function (``typed.py``); ``nag
bench A.yaml ...`` is ``train``, and the older ``--generate``, ``--kernels``, ``--data`` and
``--suite`` flags still choose the mode. The timing itself: ``bench.py`` (training steps),
``generation_bench.py``, ``kernel_bench.py``, ``data_bench.py``; the suite's rows: ``bench_suite.py``.
"""

from __future__ import annotations

import json
import re

import torch
from jsonargparse import ArgumentParser

from nag_lightning.commands.bench import benchmark, format_profiles, format_table
from nag_lightning.commands.bench_suite import ratio_to_dense_nag, suite_rows
from nag_lightning.commands.data_bench import benchmark_data, format_data_table
from nag_lightning.commands.generation_bench import benchmark_generation, format_generation_table
from nag_lightning.commands.kernel_bench import benchmark_kernels, format_kernel_table
from nag_lightning.commands.kernel_resources import format_resource_table, kernel_resources
from nag_lightning.commands.typed import TypedCommand
from nag_lightning.errors import NagError
from nag_lightning.reporting import write_atomically


def run_suite(suite: str, pattern: str | None, steps: int, warmup: int, json_path: str | None) -> list[dict]:
    """``--suite``: each row of ``bench_suite.suite_rows`` alone (built, timed, freed), the JSON
    rewritten after each, so a run cut short keeps what it measured; then the kernel table on a GPU."""
    results = []
    for name, spec, rate in suite_rows(suite, pattern):
        print(f"[suite] {name}", flush=True)
        row = benchmark([f"{spec}@{rate:g}" if rate else spec], steps, warmup)[0]
        row["row"] = name
        results.append(row)
        ratio_to_dense_nag(row, results)
        print(format_table([row]), flush=True)
        if json_path:
            write_atomically(json_path, json.dumps({"rows": results}, indent=2))
    kernels = []
    if suite == "gpu" and torch.cuda.is_available() and (pattern is None or re.search(pattern, "kernels")):
        try:
            kernels = benchmark_kernels(steps, warmup)
            print(format_kernel_table(kernels), flush=True)
        except Exception as error:  # noqa: BLE001 - the suite goes on
            print(f"[suite] kernels failed: {type(error).__name__}: {error}", flush=True)
    if json_path:
        write_atomically(json_path, json.dumps({"rows": results, "kernels": kernels}, indent=2))
    return results


def _checked(steps: int, warmup: int) -> None:
    if steps < 1 or warmup < 0:
        raise NagError("nag bench: --steps must be >= 1 and --warmup >= 0.")


def _report(table: str, rows, json_path: str | None) -> None:
    print(table)
    if json_path:
        write_atomically(json_path, json.dumps(rows, indent=2))


def train(configs: list[str], steps: int = 20, warmup: int = 3, skip_rate: float = 0.0, forward: bool = False,
          interleave: bool = False, profile: int = 0, json: str | None = None) -> None:
    """Time training steps (forward, backward, optimizer) of configs in one process.

    Args:
        configs: config files; a.yaml+b.yaml composes files; CONFIG@RATE skips RATE of (token,
            sub-layer) pairs, CONFIG@R1,R2 gives one row per rate.
        steps: timed steps per config.
        warmup: untimed warm-up steps per config.
        skip_rate: calibrate NAG skip thresholds to skip this fraction of (token, sub-layer) pairs
            (per config: CONFIG@RATE).
        forward: time forward passes without gradients (inference).
        interleave: build every config first, then time them round-robin, one step each: fair
            ratios on a machine whose speed drifts (needs the memory of all configs at once).
        profile: after timing, profile this many more steps per config (torch.profiler) and print
            the operators by self time (0: off; 3 is plenty).
        json: also write the rows as a JSON list to this path.
    """
    _checked(steps, warmup)
    if not 0.0 <= skip_rate < 1.0:
        raise NagError(f"nag bench: --skip_rate must be in [0, 1), got {skip_rate}.")
    if profile < 0:
        raise NagError("nag bench: --profile must be >= 0.")
    rows = benchmark(configs, steps, warmup, skip_rate, forward, profile, interleave)
    table = format_table(rows)
    _report(table + ("\n\n" + format_profiles(rows) if profile else ""), rows, json)


def generate(configs: list[str], steps: int = 20, warmup: int = 3, skip_rate: float = 0.0, interleave: bool = False,
             batch: int = 1, prompt_tokens: int | None = None, new_tokens: int | None = None,
             json: str | None = None) -> None:
    """Time generation: prefill and decode tokens/s and KV-cache memory, per config and CONFIG@RATE
    (NAG thresholds calibrated on the prompts).

    Args:
        configs: config files (a.yaml+b.yaml, CONFIG@RATE as for train).
        steps: timed generations per config.
        warmup: untimed generations per config.
        skip_rate: skip rate of every config without @RATE.
        interleave: time the configs round-robin, one generation each.
        batch: sequences decoded together.
        prompt_tokens: prompt tokens per sequence (default: half the context).
        new_tokens: new tokens per sequence (default: 64, or fewer when the context is shorter).
        json: also write the rows as a JSON list to this path.
    """
    _checked(steps, warmup)
    rows = benchmark_generation(configs, steps, warmup, skip_rate, interleave, batch, prompt_tokens, new_tokens)
    _report(format_generation_table(rows), rows, json)


def kernels(steps: int = 20, warmup: int = 3, json: str | None = None, registers: bool = False) -> None:
    """Time the NAG update kernels (eager, compiled, Triton on a GPU) at training sizes: ms and GB/s.

    Args:
        steps: timed calls per kernel and size.
        warmup: untimed calls first.
        json: also write the rows as a JSON list to this path.
        registers: time nothing: compile each Triton kernel for an H100/H200 (sm_90a; no GPU
            needed) at the training widths and report its registers, spills and occupancy.
    """
    if registers:
        rows = kernel_resources()
        _report(format_resource_table(rows), rows, json)
        return
    _checked(steps, warmup)
    rows = benchmark_kernels(steps, warmup)
    _report(format_kernel_table(rows), rows, json)


def data(datasets: list[str], context_length: int = 1024, batch_size: int = 8, num_workers: int = 2, steps: int = 20,
         warmup: int = 3, json: str | None = None) -> None:
    """Time the training data loader alone on `nag prepare` datasets: tokens/s delivered.

    Args:
        datasets: dataset folders or s3:// URLs.
        context_length: tokens per block.
        batch_size: blocks per batch.
        num_workers: loader worker processes.
        steps: timed batches.
        warmup: untimed batches first.
        json: also write the rows as a JSON list to this path.
    """
    _checked(steps, warmup)
    rows = benchmark_data(datasets, steps, warmup, context_length, batch_size, num_workers)
    _report(format_data_table(rows), rows, json)


def suite(machine: list[str], rows: str | None = None, steps: int = 20, warmup: int = 3, json: str | None = None) -> None:
    """The standard comparison, one row at a time: pre-norm, NAG and NAG skipping 25% (threshold,
    capacity) with each backend at the machine's shapes (bench_suite.py); on a GPU the kernel table too.

    Args:
        machine: gpu or cpu.
        rows: only the rows whose name (shape/model/backend) matches this regular expression.
        steps: timed steps per row.
        warmup: untimed warm-up steps per row.
        json: write the rows (and kernels) as JSON to this path, rewritten after each row.
    """
    _checked(steps, warmup)
    if len(machine) != 1:
        raise NagError(f"nag bench suite: name one machine, gpu or cpu; got {' '.join(machine) or 'none'}.")
    run_suite(machine[0], rows, steps, warmup, json)


# Subcommand -> (the function whose signature and docstring are its options, the list parameter
# that leading values fill).
MODES = {"train": TypedCommand(train, "configs"), "generate": TypedCommand(generate, "configs"),
         "kernels": TypedCommand(kernels), "data": TypedCommand(data, "datasets"), "suite": TypedCommand(suite, "machine")}
# The flags that chose a mode before the modes were subcommands: nag bench --generate A.yaml ...
LEGACY_MODE_FLAGS = {"--generate": "generate", "--kernels": "kernels", "--data": "data", "--suite": "suite"}


def upgrade_legacy(argv: list[str]) -> list[str]:
    """``nag bench``'s arguments in the subcommand form: ``A.yaml B.yaml ...`` is ``train A.yaml
    B.yaml ...``, ``--generate A.yaml`` is ``generate A.yaml``, ``--kernels`` is ``kernels``,
    ``--data D ...`` is ``data D ...``, ``--suite gpu`` is ``suite gpu``."""
    if not argv or argv[0] in MODES or argv[0] in ("-h", "--help"):
        return argv
    # --data=D and --suite=gpu as --data D and --suite gpu
    argv = [part for token in argv for part in (token.split("=", 1) if token.split("=")[0] in LEGACY_MODE_FLAGS
                                                 else [token])]
    flags = [flag for flag in LEGACY_MODE_FLAGS if flag in argv]
    if not flags:
        return ["train", *argv]
    if len(flags) > 1:
        raise NagError(f"nag bench: {' and '.join(flags)} are two modes; run one: nag bench "
                       f"{'|'.join(MODES)} ... (nag bench MODE --help).")
    mode, index = LEGACY_MODE_FLAGS[flags[0]], argv.index(flags[0])
    rest = argv[:index] + argv[index + 1:]
    if mode in ("generate", "kernels"):
        return [mode, *rest]
    values, after = [], argv[index + 1:]
    while after and not after[0].startswith("-"):
        values.append(after.pop(0))
    leading = argv[:index]
    if leading and not leading[0].startswith("-"):
        raise NagError(f"nag bench {mode} runs without configs ({leading[0]}): "
                       f"nag bench {mode} {' '.join(values)} [options].")
    return [mode, *values, *leading, *after]


def normalise(argv: list[str]) -> list[str]:
    """``nag bench``'s arguments as its subcommand parsers read them (``typed.py``)."""
    argv = upgrade_legacy(argv)
    return [argv[0], *MODES[argv[0]].normalise(argv[1:])] if argv and argv[0] in MODES else argv


def add_arguments(parser) -> None:
    """``nag bench``'s subcommands, each from its function's signature (see ``commands/main.py``)."""
    parser.description = __doc__.split("\n\n")[0]
    subcommands = parser.add_subcommands(dest="mode")
    for name, command in MODES.items():
        mode = ArgumentParser(prog=f"nag bench {name}")
        command.add_to(mode)
        subcommands.add_subcommand(name, mode, help=command.summary.splitlines()[0])


def run(args) -> None:
    MODES[args.mode](args[args.mode])
