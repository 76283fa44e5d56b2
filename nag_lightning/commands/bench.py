"""Timing training steps of configs in one process (``nag bench train``; the command and its
other modes are ``bench_command.py``).

Each configuration is parsed by the same LightningCLI parser as ``nag fit`` (``a.yaml+b.yaml``
composes files like repeated ``--config``; ``CONFIG@0,0.1,0.25`` gives one row per skip rate).
Steps run on synthetic tokens with the config's model, micro-batch, context length and
precision, through Fabric.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.overrides import TorchFunctionMode

from nag_lightning.commands.bench_driver import expand_specs, run_steps
from nag_lightning.commands.runs import instantiate, single_device_fabric
from nag_lightning.commands.timing import mean_ms
from nag_lightning.errors import NagError
from nag_lightning.lightning.memory import resident_mb
from nag_lightning.reporting import render_table


def calibrate_skipping(model, batch: torch.Tensor, rate: float, spec: str) -> None:
    """Thresholds (and capacity mode's capacity) that skip ``rate`` of ``batch``'s (token, sub-layer) pairs."""
    policy = model.model.require_skipping(f"nag bench {spec}@{rate:g}")
    with torch.no_grad():
        _, output = model.loss(batch, return_output=True, calibrate=rate)
    policy.calibrate_from(output.record, rate)


class PeakMemory:
    """Peak memory while a block runs: the process's resident set (sampled every 10 ms from
    /proc/self/statm, Linux) and, on a GPU, the allocator's peak."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.rss_mb, self.gpu_mb = device, None, None

    def __enter__(self) -> "PeakMemory":
        import threading

        self.rss_mb = resident_mb()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.01):
                now = resident_mb()
                if now is not None and (self.rss_mb is None or now > self.rss_mb):
                    self.rss_mb = now

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.device.type == "cuda":
            self.gpu_mb = torch.cuda.max_memory_allocated(self.device) / 2**20


# Calls that make the host wait for the device (on a GPU; on a CPU they mark where it would wait).
_SYNCING = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
            torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.numpy}


class _HostSyncCounter(TorchFunctionMode):
    """Counts the Python-level calls that read a tensor's values on the host (``_SYNCING``, and
    ``.cpu()`` of a tensor on another device): each one waits for the device to finish."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _SYNCING or func is torch.Tensor.cpu and args and args[0].device.type != "cpu":
            self.count += 1
        return func(*args, **(kwargs or {}))


PACKAGE_OPERATORS = "nag_lightning::"  # the custom operators around the Triton kernels


def dispatched_operators(events) -> int:
    """Operators a profiled step dispatched: leaf ATen operators, and each of the package's custom
    (Triton) operators once, what runs inside one not counted: on a CPU that is the Triton
    interpreter's own work. A lower bound on a GPU, where a custom operator's wrapper also
    launches a few small kernels beside its Triton kernel (output fills, the backward's gate-weight
    GEMM and parameter reductions)."""
    def inside_package_operator(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith(PACKAGE_OPERATORS):
                return True
            parent = parent.cpu_parent
        return False

    counted = 0
    for event in events:
        if event.name.startswith(PACKAGE_OPERATORS):
            counted += not inside_package_operator(event)
        elif event.name.startswith("aten::") and not any(
                child.name.startswith(("aten::", PACKAGE_OPERATORS)) for child in event.cpu_children):
            counted += not inside_package_operator(event)
    return counted


def step_proxies(step, device: torch.device, compiled: bool) -> dict:
    """Launch and synchronisation proxies of ``step`` (a forward and backward), measurable on any
    machine: ``operators`` (``dispatched_operators``: each launches at least one kernel when it
    runs eagerly), on CUDA ``kernel_launches``, and ``host_syncs``: on CUDA the synchronising
    operations CUDA's sync debug mode reports; on a CPU the host reads of tensor values, counted
    eagerly only (a Python mode around compiled code would make it recompile: None there)."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = profiler.events()
    proxies = {"operators": dispatched_operators(events)}
    if device.type == "cuda":
        proxies["kernel_launches"] = sum(1 for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel",
                                                                         "cudaLaunchKernelExC", "cuLaunchKernelEx"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        proxies["host_syncs"] = sum(1 for w in caught if "synchroniz" in str(w.message))
    elif compiled:
        proxies["host_syncs"] = None
    else:
        with _HostSyncCounter() as counter:
            step()
        proxies["host_syncs"] = counter.count
    return proxies


_PEAK_FLOPS: dict[tuple[str, str], float] = {}


def measured_peak_flops(device: torch.device, precision: str) -> float:
    """FLOP/s of a large matmul in the precision's compute dtype on ``device`` (measured once per
    process): the denominator of model FLOP utilisation. 8192^3 on a GPU; 1024^3 on a CPU (where
    an emulated bf16 product of 2048^3 would take about a minute)."""
    dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if precision.startswith("16") else torch.float32
    key = (str(device), str(dtype))
    if key not in _PEAK_FLOPS:
        n = 8192 if device.type == "cuda" else 1024
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        _PEAK_FLOPS[key] = 2 * n**3 / (mean_ms(lambda: a @ b, calls=4, warmup=1) / 1e3)
    return _PEAK_FLOPS[key]


def dynamo_counts() -> dict[str, int]:
    """torch.compile's counters so far: graphs compiled and graph breaks (all models of the process)."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def _minor_page_faults() -> int:
    """Minor page faults of this process so far: memory the C library handed out fresh (each 4 KiB
    page is zeroed by the kernel on first touch), which costs CPU steps dearly when large tensors
    are not reused."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class StepRunner:
    """One configuration set up for timed steps: the model under Fabric at the config's precision,
    AdamW, four synthetic batches, and NAG's thresholds calibrated to ``skip_rate``."""

    def __init__(self, model, batch_size: int, context_length: int, precision: str, seed: int = 0,
                 skip_rate: float = 0.0, forward_only: bool = False, spec: str = "") -> None:
        self.fabric = fabric = single_device_fabric(precision)
        model.configure_model()  # compilation and activation checkpointing, as under the Trainer
        optimizer = model.build_optimizer()
        self.model, self.optimizer = fabric.setup(model, optimizer)
        self.model.train()
        generator = torch.Generator().manual_seed(seed)
        vocab = model.config.vocab_size
        batches = [torch.randint(vocab, (batch_size, context_length + 1), generator=generator) for _ in range(4)]
        self.batches = [fabric.to_device(b) for b in batches]
        self.shape, self.forward_only, self.skip_rate, self.spec = (batch_size, context_length), forward_only, skip_rate, spec
        model.model.residual.set_training_step(10**9)  # steady state: past any warm-up of the strategy (NAG's alpha)
        self.steps_done = 0
        self.calibrate()  # here as well, so a config that cannot skip fails before anything is timed
        self.times, self.skipped, self.overflow, self.faults = [], [], [], []
        self.graphs = self.graph_breaks = self.recompiles = 0
        self.warmup_steps = 0  # set by run_steps: graphs compiled after these are recompiles
        self.error: str | None = None  # why the steps failed, if they did
        self.warmup_times: list[float] = []
        self.setup_s = 0.0
        self.peak_rss_mb = self.peak_gpu_mb = self.record = None

    def calibrate(self) -> None:
        """Set the thresholds to skip ``skip_rate`` of the next step's batch (untimed)."""
        if self.skip_rate > 0:
            with self.fabric.autocast():
                calibrate_skipping(self.model, self.batches[self.steps_done % len(self.batches)], self.skip_rate,
                                   self.spec)

    def forward_backward(self) -> None:
        """The model's part of a step (the optimizer's is the same for every configuration)."""
        self.model.begin_step()
        with self.fabric.autocast(), torch.set_grad_enabled(not self.forward_only):
            # `loss` is not `forward`, so Fabric's module wrapper does not autocast it by itself.
            loss, output = self.model.loss(self.batches[self.steps_done % len(self.batches)], return_output=True)
        self.record = output.record
        if not self.forward_only:
            self.fabric.backward(loss)

    def step(self) -> None:
        before = dynamo_counts()
        self.forward_backward()
        if not self.forward_only:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        after = dynamo_counts()
        new_graphs = after["graphs"] - before["graphs"]
        self.graphs += new_graphs
        self.graph_breaks += after["graph_breaks"] - before["graph_breaks"]
        if self.steps_done > self.warmup_steps:
            self.recompiles += new_graphs  # graphs compiled after the warm-up

    def warmup_step(self) -> None:
        """One untimed step; its wall time adds to the first steps' (compilation happens there)."""
        sync = torch.cuda.synchronize if self.fabric.device.type == "cuda" else (lambda: None)
        started = time.perf_counter()
        self.step()
        sync()
        self.warmup_times.append(time.perf_counter() - started)

    def timed_step(self) -> None:
        """One step, with its wall time, minor page faults, peak memory and realized skip rate.
        Before it (untimed) the thresholds are calibrated again on its batch, so that the realized
        rate stays at the target while the optimizer moves the gates."""
        sync = torch.cuda.synchronize if self.fabric.device.type == "cuda" else (lambda: None)
        self.calibrate()
        faults = _minor_page_faults()
        with PeakMemory(self.fabric.device) as memory:
            sync()
            started = time.perf_counter()
            self.step()
            sync()
            self.times.append((time.perf_counter() - started) * 1e3)
        self.faults.append(_minor_page_faults() - faults)
        self.peak_rss_mb = max(filter(None, (self.peak_rss_mb, memory.rss_mb)), default=None)
        self.peak_gpu_mb = max(filter(None, (self.peak_gpu_mb, memory.gpu_mb)), default=None)
        if self.skip_rate > 0:  # after the clock stopped: reading the counts synchronises
            self.skipped.append(self.record.stats().skip_rate.item())
            overflow = self.record.over_capacity_fraction()
            if overflow is not None:
                self.overflow.append(overflow.item())


def profile_operators(step, steps: int, device: torch.device, top: int = 15) -> tuple[list[dict], float]:
    """torch.profiler over ``steps`` calls of ``step``: the ``top`` operators by self time, per step,
    and the total self time per step (on a GPU, the device's busy time: below the wall time, the
    device waited for the host)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for i in range(steps):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    # Operators only: on a GPU their self time is that of the kernels they launched, which the
    # profiler also lists on their own (counting both would count the device's time twice).
    events = [e for e in profiler.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
    events = sorted(events, key=lambda e: getattr(e, attribute), reverse=True)
    total = sum(getattr(e, attribute) for e in events) or 1.0
    rows = [{"operator": e.key, "self_ms_per_step": getattr(e, attribute) / 1e3 / steps,
             "share": getattr(e, attribute) / total, "calls_per_step": e.count / steps} for e in events[:top]]
    return rows, total / 1e3 / steps


def benchmark(specs: list[str], steps: int, warmup: int, skip_rate: float = 0.0, forward_only: bool = False,
              profile_steps: int = 0, interleave: bool = False) -> list[dict]:
    """One row per configuration (and rate). A configuration that fails to build or to run gets a
    row with its ``error``, and the others go on."""
    runners, rows = [], []
    for spec, rate in expand_specs(specs, skip_rate):
        row = {"config": spec + (f"@{rate:g}" if rate else ""), "target_skip_rate": rate,
               "mode": "forward" if forward_only else "train", "error": None}
        rows.append(row)
        try:
            loaded = instantiate(spec.split("+"))
            model, data = loaded.model, loaded.datamodule
            row.update({
                "params": sum(p.numel() for p in model.parameters()),
                "backend": model.config.kernels + ("+compile" if model.hparams.compile else "")
                + ("" if model.hparams.compile_mode == "default" else f"({model.hparams.compile_mode})"),
                "skip_mode": model.config.skip.mode if model.model.skip_policy is not None else "-",
                "precision": loaded.precision,
                "batch_tokens": data.batch_size * data.context_length,
            })
            started = time.perf_counter()
            runner = StepRunner(model, data.batch_size, data.context_length, loaded.precision, skip_rate=rate,
                                forward_only=forward_only, spec=spec)
            runner.setup_s = time.perf_counter() - started
        except NagError:
            raise  # a wrong configuration: the user's to fix, before anything is timed
        except Exception as error:  # noqa: BLE001 - the row says why, the others go on
            row["error"] = f"{type(error).__name__}: {str(error).strip()[:300]}"
            runners.append(None)
            continue
        runners.append(runner)
        if not interleave:  # one configuration in memory at a time
            run_steps([runner], steps, warmup, interleave=False)
            _finish(row, runner, profile_steps)
            runners[-1] = None
            _release(runner)
    if interleave:
        live = [r for r in runners if r is not None]
        run_steps(live, steps, warmup, interleave=True)
        for row, runner in zip(rows, runners):
            if runner is not None:
                _finish(row, runner, profile_steps)
    reference = next((r for r in rows if r.get("ms_per_step_median")), None)
    for row in rows:
        row["ratio"] = row["ms_per_step_median"] / reference["ms_per_step_median"] if row.get("ms_per_step_median") else None
    return rows


def _release(runner: StepRunner) -> None:
    """Free a finished configuration's memory and compiled code before the next one is built.

    Dynamo's recompile limit counts per code object across the process: without the reset, the
    rows before a compiled row (pre-norm's 32 regional graphs, twice) used up the shared
    ``sublayer``'s 64 and the NAG rows ran eager behind 64 failing guards (H200, 2026-12-04)."""
    runner.model = runner.optimizer = runner.batches = runner.record = None
    torch.compiler.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _finish(row: dict, runner: StepRunner, profile_steps: int) -> None:
    row.update({"graphs": runner.graphs, "graph_breaks": runner.graph_breaks, "recompiles": runner.recompiles,
                "first_steps_s": runner.setup_s + sum(runner.warmup_times)})
    if runner.error is not None or not runner.times:
        row["error"] = runner.error or "no timed step"
        return
    times = runner.times
    median = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [median, median, median]
    row.update({
        "skip_rate": sum(runner.skipped) / len(runner.skipped) if runner.skipped else 0.0,
        "over_capacity": sum(runner.overflow) / len(runner.overflow) if runner.overflow else None,
        "ms_per_step_median": median,
        "ms_per_step_iqr": q[2] - q[0],
        "tokens_per_sec": row["batch_tokens"] / (median / 1e3),
        "peak_rss_mb": runner.peak_rss_mb,
        "peak_gpu_mb": runner.peak_gpu_mb,
        "page_faults_per_step": statistics.median(runner.faults),
    })
    # Model FLOP utilisation: executed training FLOPs (3x the forward's, padding rows included, flops.py)
    # over the device's measured matmul peak.
    lightning_module = runner.model.module if hasattr(runner.model, "module") else runner.model
    stats = runner.record.stats() if runner.record is not None and runner.record.skipped_any else None
    forward = lightning_module.model.forward_flops(*runner.shape, stats)[0].item()
    row["train_flops_per_step"] = (1 if runner.forward_only else 3) * forward
    row["peak_flops_measured"] = measured_peak_flops(runner.fabric.device, row["precision"])
    row["mfu"] = row["train_flops_per_step"] / (median / 1e3) / row["peak_flops_measured"]
    try:
        compiled = bool(lightning_module.hparams.compile)
        row.update(step_proxies(runner.forward_backward, runner.fabric.device, compiled))
        runner.optimizer.zero_grad(set_to_none=True)
    except Exception as error:  # noqa: BLE001 - the timing stands; the proxies say why they are missing
        row["proxies_error"] = f"{type(error).__name__}: {error}"[:300]
    if profile_steps:
        row["profile"], row["profile_self_ms_per_step"] = profile_operators(lambda _: runner.step(), profile_steps,
                                                                            runner.fabric.device)


def format_profiles(rows: list[dict]) -> str:
    """Per row, its top operators by self time (the rows' ``profile``)."""
    blocks = []
    for row in rows:
        if not row.get("profile"):
            continue
        lines = [[p["operator"][:64], f"{p['self_ms_per_step']:.2f}", f"{100 * p['share']:.1f}%",
                  f"{p['calls_per_step']:.0f}"] for p in row["profile"]]
        blocks.append(f"profile of {row['config']} ({row['mode']}, skip {row['skip_rate']:.3f}, "
                      f"{row['ms_per_step_median']:.1f} ms/step unprofiled, "
                      f"{row['profile_self_ms_per_step']:.1f} ms/step of operator self time):\n"
                      + render_table(["operator", "self ms/step", "share", "calls/step"], lines))
    return "\n\n".join(blocks)


def format_table(rows: list[dict]) -> str:
    """The timing table, then the launch and synchronisation proxies, then the rows that failed."""
    ok = [r for r in rows if r.get("ms_per_step_median")]
    header = ["config", "params", "backend", "skip_mode", "precision", "mode", "skip_rate", "ms/step (median ± IQR/2)",
              "tokens/s", "MFU", "peak_rss_mb", "faults/step", "ratio"]
    lines = [[r.get("row", r["config"]), f"{r['params'] / 1e6:.2f}M", r["backend"], r["skip_mode"], r["precision"],
              r["mode"], f"{r['skip_rate']:.3f}", f"{r['ms_per_step_median']:.1f} ± {r['ms_per_step_iqr'] / 2:.1f}",
              f"{r['tokens_per_sec']:,.0f}", f"{100 * r['mfu']:.1f}%",
              "?" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:,.0f}",
              f"{r['page_faults_per_step']:,.0f}", "-" if r["ratio"] is None else f"{r['ratio']:.3f}"] for r in ok]
    if any(r["peak_gpu_mb"] is not None for r in ok):
        header.insert(-1, "peak_gpu_mb")
        for line, r in zip(lines, ok):
            line.insert(-1, "?" if r["peak_gpu_mb"] is None else f"{r['peak_gpu_mb']:,.0f}")
    text = render_table(header, lines)
    proxy_header = ["config", "over_capacity", "host_syncs/step", "operators/step", "kernel_launches/step",
                    "graphs", "graph_breaks", "recompiles", "first steps s"]
    proxy_lines = [[r.get("row", r["config"]), "-" if r.get("over_capacity") is None else f"{r['over_capacity']:.3f}",
                    "-" if r.get("host_syncs", "?") is None else str(r.get("host_syncs", "?")), str(r.get("operators", "?")), str(r.get("kernel_launches", "-")),
                    str(r["graphs"]), str(r["graph_breaks"]), str(r["recompiles"]), f"{r['first_steps_s']:.1f}"]
                   for r in ok]
    text += "\n\n" + render_table(proxy_header, proxy_lines)
    failed = [r for r in rows if r.get("error")]
    if failed:
        text += "\n\nfailed:\n" + "\n".join(f"  {r.get('row', r['config'])}: {r['error']}" for r in failed)
    return text
