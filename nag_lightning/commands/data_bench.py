"""``nag bench --data DIR_OR_URL``: how fast the training data loader delivers tokens, alone (no
model), so a user can tell whether loading keeps up with a GPU's tokens/s (``nag bench``'s
training rows)."""

from __future__ import annotations

import time

from nag_lightning.data import TokenShardDataModule
from nag_lightning.errors import NagError
from nag_lightning.reporting import render_table


def benchmark_data(sources: list[str], steps: int, warmup: int, context_length: int, batch_size: int,
                   num_workers: int) -> list[dict]:
    """One row per dataset: the first batch's latency, then ``steps`` batches timed after ``warmup``."""
    rows = []
    for source in sources:
        data = TokenShardDataModule(source, context_length=context_length, batch_size=batch_size,
                                    num_workers=num_workers)
        data.setup("fit")
        started = time.perf_counter()
        batches = iter(data.train_dataloader())
        try:
            next(batches)
            first = time.perf_counter() - started
            for _ in range(warmup):
                next(batches)
            started = time.perf_counter()
            for _ in range(steps):
                next(batches)
        except StopIteration:
            raise NagError(f"nag bench --data: {source} ran out of training blocks before {1 + warmup + steps} batches "
                           f"of {batch_size} x {context_length + 1} tokens; lower --steps, --warmup or "
                           "--batch_size.") from None
        elapsed = time.perf_counter() - started
        tokens = steps * batch_size * context_length
        rows.append({"data": source, "context_length": context_length, "batch_size": batch_size,
                     "num_workers": num_workers, "first_batch_s": first, "batches_per_s": steps / elapsed,
                     "tokens_per_s": tokens / elapsed})
    return rows


def format_data_table(rows: list[dict]) -> str:
    return render_table(["data", "batch x context", "workers", "first batch s", "batches/s", "tokens/s"],
                        [[r["data"], f"{r['batch_size']} x {r['context_length']}", str(r["num_workers"]),
                          f"{r['first_batch_s']:.3f}", f"{r['batches_per_s']:.1f}", f"{r['tokens_per_s']:,.0f}"]
                         for r in rows])
