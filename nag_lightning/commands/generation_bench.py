"""``nag bench --generate``: prefill and decode speed and KV-cache memory of configs, dense and skipping.

Per configuration (and skip rate, ``CONFIG@RATE``): random prompt tokens of ``--prompt_tokens``
per sequence, ``--batch`` sequences, generated ``--new_tokens`` further with the KV cache at the
config's precision. Prefill is the time to the first new token; decode, the time of each further
token. NAG's thresholds are calibrated on one forward over the prompts (``generate.py``), so the
realized rate while decoding (shown) can differ from the target.
"""

from __future__ import annotations

import statistics

import torch

from nag_lightning.commands.bench_driver import expand_specs, run_steps
from nag_lightning.commands.generate import calibrate_on_prompts, decode_skip_rate, timed
from nag_lightning.commands.runs import instantiate, single_device_fabric
from nag_lightning.errors import NagError
from nag_lightning.model.generation import sample_tokens
from nag_lightning.model.kv_cache import KVCache
from nag_lightning.reporting import render_table


class GenerationRunner:
    """One configuration set up for timed generations; ``step`` and ``timed_step`` as
    ``bench.StepRunner``'s, so ``bench_driver.run_steps`` interleaves them alike."""

    def __init__(self, model, precision: str, batch: int, prompt_tokens: int, new_tokens: int,
                 skip_rate: float, spec: str, seed: int = 0) -> None:
        self.fabric = single_device_fabric(precision)
        self.lightning_module = self.fabric.setup_module(model)
        self.lightning_module.eval()
        self.model = model.model
        self.model.residual.set_training_step(10**9)  # steady state: past any warm-up (NAG's alpha)
        generator = torch.Generator().manual_seed(seed)
        self.prompts = torch.randint(self.model.config.vocab_size, (batch, prompt_tokens), generator=generator).tolist()
        self.new_tokens, self.skip_rate = new_tokens, skip_rate
        self.prefill_ms, self.decode_ms, self.skipped, self.kv_cache_bytes = [], [], [], 0
        self.error: str | None = None  # why its generations failed, if they did (bench_driver.run_steps)
        self.warmup_steps = 0
        try:
            with torch.no_grad(), self.fabric.autocast():
                calibrate_on_prompts(self.model, self.prompts, skip_rate, source=spec)
        except NagError as error:
            raise NagError(f"nag bench --generate: {error}") from None

    def _tokens(self, cache: KVCache, records: list | None = None):
        return sample_tokens(self.model, self.prompts, self.new_tokens, temperature=0.0, cache=cache, records=records)

    def step(self) -> None:
        """One untimed generation (warm-up)."""
        with torch.no_grad(), self.fabric.autocast():
            for _ in self._tokens(KVCache(self.model.config, len(self.prompts))):
                pass

    warmup_step = step

    def timed_step(self) -> None:
        """One generation: its prefill time, its median decode step and its skip rate while decoding."""
        cache = KVCache(self.model.config, len(self.prompts))
        decode, records = [], []
        with torch.no_grad(), self.fabric.autocast():
            for index, (_, seconds) in enumerate(timed(self._tokens(cache, records), self.fabric.device)):
                if index == 0:
                    self.prefill_ms.append(seconds * 1e3)
                    continue
                decode.append(seconds * 1e3)
                if (rate := decode_skip_rate(records[-1])) is not None:
                    self.skipped.append(rate)
        self.decode_ms.append(statistics.median(decode))
        self.kv_cache_bytes = cache.nbytes


def lengths_for(context: int, prompt_tokens: int | None, new_tokens: int | None, spec: str) -> tuple[int, int]:
    """(prompt tokens, new tokens): by default half the context and up to 64 new tokens."""
    prompt = context // 2 if prompt_tokens is None else prompt_tokens
    new = min(64, context - prompt + 1) if new_tokens is None else new_tokens
    if prompt < 1 or new < 2:
        raise NagError(f"nag bench --generate: {spec}: --prompt_tokens must be >= 1 and --new_tokens >= 2 "
                       "(one prefill and at least one decode step).")
    if prompt + new - 1 > context:
        raise NagError(f"nag bench --generate: {spec}: {prompt} prompt tokens and {new} new tokens do not fit its "
                       f"context_length={context} (at most {context - prompt + 1} new tokens after {prompt}); "
                       "lower --prompt_tokens or --new_tokens.")
    return prompt, new


def benchmark_generation(specs: list[str], steps: int, warmup: int, skip_rate: float, interleave: bool,
                         batch: int, prompt_tokens: int | None, new_tokens: int | None) -> list[dict]:
    if batch < 1:
        raise NagError(f"nag bench --generate: --batch must be >= 1, got {batch}.")
    runners, rows = [], []
    for spec, rate in expand_specs(specs, skip_rate):
        loaded = instantiate(spec.split("+"))
        model = loaded.model
        prompt, new = lengths_for(model.config.context_length, prompt_tokens, new_tokens, spec)
        runner = GenerationRunner(model, loaded.precision, batch, prompt, new, rate, spec)
        runners.append(runner)
        rows.append({"config": spec + (f"@{rate:g}" if rate else ""), "params": sum(p.numel() for p in model.parameters()),
                     "precision": loaded.precision, "mode": "generate", "batch": batch, "prompt_tokens": prompt,
                     "new_tokens": new, "target_skip_rate": rate})
        if not interleave:
            run_steps([runner], steps, warmup, interleave=False)
            _finish(rows[-1], runner)
            runners[-1] = None
    if interleave:
        run_steps(runners, steps, warmup, interleave=True)
        for row, runner in zip(rows, runners):
            _finish(row, runner)
    for row in rows:
        row["ratio"] = row["decode_ms_per_step_median"] / rows[0]["decode_ms_per_step_median"]
    return rows


def _finish(row: dict, runner: GenerationRunner) -> None:
    if runner.error is not None:
        raise RuntimeError(f"nag bench --generate: {row['config']}: {runner.error}")
    prefill, decode = statistics.median(runner.prefill_ms), statistics.median(runner.decode_ms)
    row.update({
        "skip_rate": sum(runner.skipped) / len(runner.skipped) if runner.skipped else 0.0,
        "prefill_ms_median": prefill,
        "prefill_tokens_per_sec": row["batch"] * row["prompt_tokens"] / (prefill / 1e3),
        "decode_ms_per_step_median": decode,
        "decode_tokens_per_sec": row["batch"] / (decode / 1e3),
        "kv_cache_mb": runner.kv_cache_bytes / 2**20,
    })


def format_generation_table(rows: list[dict]) -> str:
    header = ["config", "params", "precision", "batch", "prompt+new", "skip_rate (decode)", "prefill ms",
              "prefill tokens/s", "decode ms/step", "decode tokens/s", "KV cache MB", "ratio"]
    lines = [[r["config"], f"{r['params'] / 1e6:.2f}M", r["precision"], str(r["batch"]),
              f"{r['prompt_tokens']}+{r['new_tokens']}", f"{r['skip_rate']:.3f}", f"{r['prefill_ms_median']:.1f}",
              f"{r['prefill_tokens_per_sec']:,.0f}", f"{r['decode_ms_per_step_median']:.2f}",
              f"{r['decode_tokens_per_sec']:,.1f}", f"{r['kv_cache_mb']:.2f}", f"{r['ratio']:.3f}"] for r in rows]
    return render_table(header, lines)
