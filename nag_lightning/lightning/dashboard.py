"""What TensorBoard shows of a run: ``TensorBoardLogger`` (Lightning's, with the hyperparameters and
final metrics in the HPARAMS tab and no placeholder charts) and the custom-scalars layout that
groups the per-layer tags into one chart per quantity.

Time Series, TensorBoard's first tab, sorts tag groups alphabetically (``flops`` before ``train``)
and cannot be told otherwise from the logs; it opens with chosen charts pinned at the top through
its ``pinnedCards`` URL parameter, which ``first_screen_url`` builds for the loss curves and
``nag fit`` prints.
"""

from __future__ import annotations

import json
import re
from argparse import Namespace
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

# The HPARAMS tab's metric columns: the last value each run logged under these scalar tags.
FINAL_METRICS = ("val/loss", "val/bpb", "mod/skip_rate", "flops/executed_total", "train/tokens")

PINNED_TAGS = ("train/loss", "val/loss", "val/bpb")

LAYER = r"layer_\d+"

# Category -> chart title -> the tags (regular expressions) drawn in it, one line per matching tag;
# the categories appear in this order.
LAYOUT = {
    "1. training": {
        "loss (train and validation)": ["train/loss", "val/loss"],
        "validation bits per byte": ["val/bpb"],
        "learning rate by group": [r"train/lr/.*"],
        "tokens per second per rank": ["train/device/items_per_sec"],
    },
    "2. depth: the residual stream": {
        "residual RMS by layer": [rf"residual/rms/{LAYER}"],
        "relative update by layer": [rf"residual/relative_update/{LAYER}"],
        "rotation (degrees) by layer": [rf"residual/rotation_deg/{LAYER}"],
        "NAG step a by layer": [rf"nag/step/{LAYER}"],
    },
    "3. depth: skipping": {
        "skip rate by layer": [rf"mod/skip_rate/{LAYER}"],
        "skip rate: realized and target": ["mod/skip_rate", "mod/target_rate"],
        "skip threshold(s)": ["mod/threshold", rf"mod/threshold/{LAYER}"],
        "executed FLOPs per token": ["flops/executed_per_token", "flops/dense_per_token"],
    },
    "4. depth: inside the model": {
        "attention sink score by layer": [rf"inspect/sink_score/{LAYER}"],
        "residual max/median by layer": [rf"inspect/massive/residual/{LAYER}"],
        "sub-layer output max/median by layer": [rf"inspect/massive/output/{LAYER}"],
        "residual excess kurtosis by layer": [rf"inspect/kurtosis/residual/{LAYER}"],
        "sub-layer output excess kurtosis by layer": [rf"inspect/kurtosis/output/{LAYER}"],
        "weight excess kurtosis by layer (largest matrix)": [rf"inspect/kurtosis/weight/{LAYER}"],
    },
}


def first_screen_url(host: str = "localhost", port: int = 6006) -> str:
    """TensorBoard's address with the loss curves pinned at the top of the Time Series tab."""
    cards = [{"plugin": "scalars", "tag": tag} for tag in PINNED_TAGS]
    pinned = quote(json.dumps(cards, separators=(",", ":")), safe="[]{},:/")
    return f"http://{host}:{port}/?pinnedCards={pinned}#timeseries"


def hparams_for_tensorboard(hparams: dict[str, Any]) -> dict[str, Any]:
    """Flat, TensorBoard-typed hyperparameters without the entries LightningCLI adds for itself
    (``_instantiator``, ``_class_path``)."""
    flat = flatten_hyperparameters(dict(hparams))
    return {key: value if type(value) in (bool, int, float, str) else str(value) for key, value in flat.items()
            if not any(part.startswith("_") for part in re.split(r"[/.]", key))}


def flatten_hyperparameters(value: Any, key: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [{"d": 2}]}`` -> ``{"a/b": 1, "c/0/d": 2}``, dataclasses and namespaces
    opened like mappings (the names TensorBoard's HPARAMS tab shows, as Lightning's logger writes them)."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    elif isinstance(value, Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, list) and value and all(isinstance(item, Mapping) for item in value):
        items = enumerate(value)
    else:
        return {key: value}
    flat: dict[str, Any] = {}
    for name, item in items:
        flat.update(flatten_hyperparameters(item, f"{key}/{name}" if key else str(name)))
    return flat


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's ``TensorBoardLogger`` for these runs.

    - HPARAMS: the session (every hyperparameter logged before the first metrics, the module's and
      data module's and the global batch's, flattened) is written once, when the first metrics
      arrive, with ``FINAL_METRICS`` as its metric columns; no ``hp_metric = -1`` placeholder.
    - No ``epoch`` chart: training is counted in optimizer steps over a token stream, where
      Lightning's epoch counter says nothing.
    - The custom-scalars layout (``LAYOUT``) is written with the session.
    """

    def __init__(self, *args, default_hp_metric: bool = False, **kwargs) -> None:
        super().__init__(*args, default_hp_metric=default_hp_metric, **kwargs)
        self._session_written = False

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        metrics = {name: value for name, value in metrics.items() if name != "epoch"}
        if not self._session_written:
            self._write_session()
        if metrics:
            super().log_metrics(metrics, step)

    def _write_session(self) -> None:
        from torch.utils.tensorboard.summary import hparams

        self._session_written = True
        writer = self.experiment._get_file_writer()  # private (torch's SummaryWriter), as Lightning's own log_hyperparams uses it: tests/test_private_apis.py
        if len(list(Path(self.log_dir).glob("events.out.tfevents.*"))) > 1:
            return  # `nag validate` logging into a finished run's folder: the run has its session and layout
        experiment, start, end = hparams(hparams_for_tensorboard(self.hparams), dict.fromkeys(FINAL_METRICS, 0.0))
        for summary in (experiment, start, end):
            writer.add_summary(summary)
        self.experiment.add_custom_scalars({category: {chart: ["Multiline", tags] for chart, tags in charts.items()}
                                            for category, charts in LAYOUT.items()})
