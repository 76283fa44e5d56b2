"""``nag bench --suite gpu|cpu``: one command for the comparison that matters on a machine.

Rows: pre-norm, NAG, and NAG skipping 25% in threshold and capacity mode, each with the torch,
triton and compile backends (and CUDA graphs on a GPU), at the suite's shapes; then, on a GPU,
the NAG update kernels' GB/s. Every row is built, run and freed on its own (a row that fails
says why and the suite goes on) and the JSON is rewritten after each row, so a run cut short
keeps what it measured. ``--rows REGEX`` keeps the rows whose name matches.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from nag_lightning.errors import NagError
from nag_lightning.reporting import write_atomically

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# (shape name, base config overlays) per suite.
SHAPES = {
    "gpu": [("baseline", ["baseline.yaml"]), ("large", ["baseline.yaml", "shapes/large.yaml"])],
    "cpu": [("quickstart", ["quickstart.yaml"])],
}
# (model name, overlays, skip rate)
MODELS = [
    ("prenorm", [], 0.0),
    ("nag", ["residual/nag.yaml"], 0.0),
    ("nag-threshold@0.25", ["residual/nag.yaml"], 0.25),
    ("nag-capacity@0.25", ["residual/nag.yaml", "skip/capacity.yaml"], 0.25),
]
BACKENDS = {
    "gpu": [("torch", ["kernels/torch.yaml"]), ("triton", ["kernels/triton.yaml"]),
            ("compile", ["kernels/compile.yaml"]), ("cuda_graphs", ["kernels/cuda_graphs.yaml"])],
    "cpu": [("torch", ["kernels/torch.yaml"]), ("compile", ["kernels/compile.yaml"])],
}


def suite_rows(suite: str, pattern: str | None = None) -> list[tuple[str, str, float]]:
    """(row name, CONFIG spec with +-joined overlays, skip rate) of ``suite``, filtered by ``pattern``."""
    if suite not in SHAPES:
        raise NagError(f"nag bench --suite: unknown suite {suite!r}; choose gpu or cpu.")
    if not CONFIGS.is_dir():
        raise NagError(f"nag bench --suite needs the repository's configs/ folder next to the package ({CONFIGS}); "
                       "run it from a source checkout (pip install -e .).")
    rows = []
    for shape, base in SHAPES[suite]:
        for model, overlays, rate in MODELS:
            for backend, kernels in BACKENDS[suite]:
                if model == "prenorm" and backend == "triton":
                    continue  # pre-norm's only Triton kernel is RMSNorm; the NAG rows carry the comparison
                name = f"{shape}/{model}/{backend}"
                spec = "+".join(str(CONFIGS / f) for f in base + overlays + kernels)
                rows.append((name, spec, rate))
    if pattern is not None:
        rows = [row for row in rows if re.search(pattern, row[0])]
        if not rows:
            raise NagError(f"nag bench --rows {pattern!r} matches no row of the {suite} suite.")
    return rows


def _ratio_to_dense_nag(row: dict, results: list[dict]) -> None:
    """``ratio``: the row's step time over dense NAG's at the same shape and backend (None until that row ran)."""
    shape, _, backend = row["row"].split("/")
    dense = next((r for r in results if r["row"] == f"{shape}/nag/{backend}" and r.get("ms_per_step_median")), None)
    row["ratio"] = row["ms_per_step_median"] / dense["ms_per_step_median"] if dense and row.get("ms_per_step_median") \
        else None


def run_suite(suite: str, pattern: str | None, steps: int, warmup: int, json_path: str | None) -> list[dict]:
    """Each row alone (built, timed, freed), the JSON rewritten after each; then the kernel table on a GPU."""
    import torch

    from nag_lightning.bench import benchmark, format_table

    results = []
    for name, spec, rate in suite_rows(suite, pattern):
        print(f"[suite] {name}", flush=True)
        row = benchmark([f"{spec}@{rate:g}" if rate else spec], steps, warmup)[0]
        row["row"] = name
        results.append(row)
        _ratio_to_dense_nag(row, results)
        print(format_table([row]), flush=True)
        if json_path:
            write_atomically(json_path, json.dumps({"rows": results}, indent=2))
    kernels = []
    if suite == "gpu" and torch.cuda.is_available() and (pattern is None or re.search(pattern, "kernels")):
        from nag_lightning.kernel_bench import benchmark_kernels, format_kernel_table

        try:
            kernels = benchmark_kernels(steps, warmup)
            print(format_kernel_table(kernels), flush=True)
        except Exception as error:  # noqa: BLE001 - the suite goes on
            print(f"[suite] kernels failed: {type(error).__name__}: {error}", flush=True)
    if json_path:
        write_atomically(json_path, json.dumps({"rows": results, "kernels": kernels}, indent=2))
    return results
