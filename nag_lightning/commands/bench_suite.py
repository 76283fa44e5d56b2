"""The rows of ``nag bench --suite gpu|cpu`` (run by ``bench_command.run_suite``): the comparison that matters on a machine.

Rows: pre-norm, NAG, and NAG skipping 25% in threshold and capacity mode, each with the torch,
triton and compile backends (and CUDA graphs on a GPU), at the suite's shapes; then, on a GPU,
the NAG update kernels' GB/s. Every row is built, run and freed on its own (a row that fails
says why and the suite goes on) and the JSON is rewritten after each row, so a run cut short
keeps what it measured. ``--rows REGEX`` keeps the rows whose name matches.
"""

from __future__ import annotations

import re
from pathlib import Path

from nag_lightning.errors import NagError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

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
            ("compile", ["kernels/compile.yaml"]), ("cuda_graphs", ["kernels/cuda_graphs.yaml"]),
            # The Triton kernels inside compiled blocks (registered with torch.library.triton_op).
            ("triton_compile", ["kernels/triton.yaml", "kernels/compile.yaml"]),
            ("triton_cuda_graphs", ["kernels/triton.yaml", "kernels/cuda_graphs.yaml"])],
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
                if model == "prenorm" and backend.startswith("triton"):
                    continue  # pre-norm's only Triton kernel is RMSNorm; the NAG rows carry the comparison
                name = f"{shape}/{model}/{backend}"
                spec = "+".join(str(CONFIGS / f) for f in base + overlays + kernels)
                rows.append((name, spec, rate))
    if pattern is not None:
        rows = [row for row in rows if re.search(pattern, row[0])]
        if not rows:
            raise NagError(f"nag bench --rows {pattern!r} matches no row of the {suite} suite.")
    return rows


def ratio_to_dense_nag(row: dict, results: list[dict]) -> None:
    """``ratio``: the row's step time over dense NAG's at the same shape and backend (None until that row ran)."""
    shape, _, backend = row["row"].split("/")
    dense = next((r for r in results if r["row"] == f"{shape}/nag/{backend}" and r.get("ms_per_step_median")), None)
    row["ratio"] = row["ms_per_step_median"] / dense["ms_per_step_median"] if dense and row.get("ms_per_step_median") \
        else None
