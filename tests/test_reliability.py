"""A run never lies about its result: divergence stops it, last.ckpt is the final model,
checkpoint writes are atomic, and validation never hides a NaN."""

import errno
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from nag_lightning.commands.main import main
from nag_lightning.errors import NagError
from nag_lightning.lightning.guards import AtomicCheckpointIO

TINY = str(REPO / "tests" / "configs" / "tiny.yaml")


def fit(args, tiny_data, capsys):
    """(exit code, stdout, stderr) of `nag fit` on the tiny config, in this process."""
    code = 0
    try:
        main(["fit", "--config", TINY, "--data.init_args.data_dir", str(tiny_data),
              "--trainer.enable_progress_bar=false", *args])
    except SystemExit as exit_:
        code = exit_.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def all_finite(checkpoint: Path) -> bool:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_divergence_stops_the_run_before_anything_non_finite_is_saved(tiny_data, capsys):
    every_step = ('[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
                  '"init_args": {"every_n_train_steps": 1, "save_top_k": -1, "save_last": true}}]')
    code, out, err = fit(["--model.init_args.learning_rate", "1e6", "--trainer.max_steps", "60",
                          "--trainer.gradient_clip_val", "null", "--trainer.val_check_interval", "60",
                          "--trainer.callbacks", every_step], tiny_data, capsys)
    assert code == 2, err[-2000:]
    message = [line for line in err.splitlines() if line.startswith("nag: error: training diverged at step")]
    assert len(message) == 1, err[-2000:]
    assert "learning rate" in message[0] and ("last finite loss" in message[0] or "no finite loss" in message[0])
    assert "nag fit done" not in out
    checkpoints = sorted(Path("runs/tiny").rglob("*.ckpt"))
    assert checkpoints, "checkpoints every step: some must precede the divergence"
    for checkpoint in checkpoints:
        assert all_finite(checkpoint), checkpoint


def test_divergence_guard_names_the_non_finite_gradients():
    from nag_lightning.lightning.guards import DivergenceGuard, TrainingDiverged
    from nag_lightning.lightning.lit_module import LanguageModel

    model = LanguageModel()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model.model.blocks[0].mlp.down_proj.weight.grad[0, 0] = float("inf")

    class Strategy:
        @staticmethod
        def reduce_boolean_decision(decision, all=True):
            return decision

    class Trainer:
        strategy, optimizers, global_step, checkpoint_callback, precision_plugin = Strategy(), [], 7, None, None

    guard = DivergenceGuard()
    with pytest.raises(TrainingDiverged, match=r"step 7: a non-finite gradient.*model\.blocks\.0\.mlp\.down_proj\.weight \(1 of"):
        guard.on_before_optimizer_step(Trainer(), model, None)


def test_validation_keeps_nans_visible():
    from nag_lightning.lightning.lit_module import LanguageModel

    metric = LanguageModel().val_loss
    metric.update(torch.tensor(2.0), weight=10)
    metric.update(torch.tensor(float("nan")), weight=10)
    assert torch.isnan(metric.compute())


def test_last_checkpoint_is_the_final_model(tiny_data, capsys):
    code, _, err = fit(["--trainer.max_steps", "25", "--trainer.val_check_interval", "25"], tiny_data, capsys)
    assert code == 0, err[-2000:]
    last = next(Path("runs/tiny").rglob("last.ckpt"))
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 25  # checkpoints every 10
    # `nag predict` of it: one batch of prompts (4) by default, and for "1" too (which the Trainer reads as 100%).
    for limit in ([], ["--trainer.limit_predict_batches", "1"]):
        code, out, err = 0, None, None
        try:
            main(["predict", "--config", TINY, "--data.init_args.data_dir", str(tiny_data), "--ckpt_path", str(last),
                  "--trainer.enable_progress_bar=false", *limit])
        except SystemExit as exit_:
            code = exit_.code or 0
        captured = capsys.readouterr()
        assert code == 0, captured.err[-2000:]
        assert captured.out.count("--- continuation ---") == 4, limit


def test_atomic_checkpoint_survives_a_full_disk(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "run" / "step10.ckpt"
    io.save_checkpoint({"weights": torch.arange(4.0)}, target)

    def write_half_then_fail(obj, file):
        file.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("nag_lightning.lightning.guards.torch.save", write_half_then_fail)
    with pytest.raises(NagError, match=f"out of disk space while saving the checkpoint step10.ckpt in {target.parent}"):
        io.save_checkpoint({"weights": torch.zeros(4)}, target)
    assert [p.name for p in target.parent.iterdir()] == ["step10.ckpt"]  # no temporary left behind
    torch.testing.assert_close(torch.load(target, weights_only=True)["weights"], torch.arange(4.0))


@pytest.mark.parametrize("free_bytes, full", [(4096, True), (10**10, False)])
def test_torch_short_write_on_a_full_disk_is_named_as_such(tmp_path, monkeypatch, free_bytes, full):
    """torch's zip writer reports a short write as a RuntimeError without an errno: a nearly full
    filesystem makes it the out-of-disk-space error; with space left it stays what it was."""
    import shutil
    from collections import namedtuple

    io = AtomicCheckpointIO()
    target = tmp_path / "run" / "last.ckpt"
    io.save_checkpoint({"weights": torch.arange(4.0)}, target)

    def short_write(obj, file):
        file.write(b"partial bytes")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 28495552 vs 28495440")

    usage = namedtuple("usage", "total used free")
    real_usage = shutil.disk_usage

    def disk_usage(folder):  # a full disk frees its space again once the partial file is removed
        partial = [p for p in target.parent.iterdir() if p.name != "last.ckpt"]
        free = free_bytes if partial else 10**10
        return usage(real_usage(folder).total, real_usage(folder).total - free, free)

    monkeypatch.setattr("nag_lightning.lightning.guards.torch.save", short_write)
    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    with pytest.raises(NagError if full else RuntimeError, match="out of disk space" if full else "unexpected pos"):
        io.save_checkpoint({"weights": torch.zeros(4)}, target)
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]
    torch.testing.assert_close(torch.load(target, weights_only=True)["weights"], torch.arange(4.0))


def test_a_full_disk_during_fit_is_one_clear_error_and_keeps_earlier_checkpoints(tiny_data, capsys, monkeypatch):
    import nag_lightning.lightning.guards as guards

    real_save, saves = torch.save, []

    def save_then_run_out_of_space(obj, file):
        saves.append(1)
        if len(saves) > 1:
            file.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, file)

    monkeypatch.setattr(guards.torch, "save", save_then_run_out_of_space)
    code, _, err = fit(["--trainer.max_steps", "20"], tiny_data, capsys)
    assert code == 2, err[-2000:]
    assert "nag: error: out of disk space while saving the checkpoint" in err
    checkpoints = list(Path("runs/tiny").rglob("*.ckpt"))
    assert len(checkpoints) == 1, checkpoints  # the step checkpoint; last.ckpt's write ran out of space
    assert not list(Path("runs/tiny").rglob(".*.tmp-*"))  # no temporary file left behind
    monkeypatch.setattr(guards.torch, "save", real_save)
    assert all_finite(checkpoints[0])


def test_resuming_with_a_different_architecture_names_the_fields(tiny_data, capsys):
    code, _, err = fit(["--trainer.max_steps", "10", "--trainer.val_check_interval", "10"], tiny_data, capsys)
    assert code == 0, err[-2000:]
    checkpoint = str(next(Path("runs/tiny").rglob("last.ckpt")))
    code, _, err = fit(["--config", str(REPO / "configs/residual/nag.yaml"), "--ckpt_path", checkpoint], tiny_data, capsys)
    assert code == 2
    assert ("nag: error: --ckpt_path " + checkpoint + " holds a different model than the config: "
            "model.init_args.config.residual: checkpoint 'nag_lightning.model.residual.prenorm.PreNorm'") in err, err[-2000:]
    code, _, err = fit(["--model.init_args.config.n_layers", "3", "--ckpt_path", checkpoint], tiny_data, capsys)
    assert code == 2 and "model.init_args.config.n_layers: checkpoint 2, config 3" in err, err[-2000:]
    for command in ("validate", "test", "predict"):
        code, err = run([command, "--config", TINY, "--data.init_args.data_dir", str(tiny_data),
                         "--model.init_args.config.d_model", "64", "--ckpt_path", checkpoint], capsys)
        assert code == 2 and "model.init_args.config.d_model: checkpoint 32, config 64" in err, (command, err[-2000:])
    # Training settings given with the resume apply.
    code, _, err = fit(["--trainer.max_steps", "12", "--model.init_args.learning_rate", "0.00123",
                        "--ckpt_path", checkpoint], tiny_data, capsys)
    assert code == 0, err[-2000:]
    resumed = sorted(Path("runs/tiny").glob("version_*"))[-1] / "checkpoints" / "last.ckpt"
    saved = torch.load(resumed, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 12 and saved["hyper_parameters"]["learning_rate"] == 0.00123


def test_a_checkpoint_from_before_renamed_fields_resumes_with_a_config(tiny_data, capsys):
    """Its saved config still says kernel_backend (now kernels): with --config the run's settings
    apply and the checkpoint's are read through ModelConfig's upgrades, never re-parsed raw."""
    code, _, err = fit(["--trainer.max_steps", "4", "--trainer.val_check_interval", "4"], tiny_data, capsys)
    assert code == 0, err[-2000:]
    checkpoint_path = next(Path("runs/tiny").rglob("last.ckpt"))
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    config = checkpoint["hyper_parameters"]["config"]
    config["kernel_backend"] = config.pop("kernels")
    torch.save(checkpoint, checkpoint_path)
    code, _, err = fit(["--trainer.max_steps", "6", "--ckpt_path", str(checkpoint_path)], tiny_data, capsys)
    assert code == 0, err[-2000:]
    resumed = sorted(Path("runs/tiny").glob("version_*"))[-1] / "checkpoints" / "last.ckpt"
    assert torch.load(resumed, map_location="cpu", weights_only=True)["global_step"] == 6


@pytest.mark.parametrize("content", [b"not a checkpoint at all", None])
def test_a_damaged_checkpoint_is_one_clear_error(tiny_data, capsys, tmp_path, content):
    path = tmp_path / "bad.ckpt"
    if content is None:  # a real checkpoint, truncated
        code, _, err = fit(["--trainer.max_steps", "10", "--trainer.val_check_interval", "10"], tiny_data, capsys)
        assert code == 0, err[-2000:]
        content = next(Path("runs/tiny").rglob("last.ckpt")).read_bytes()[:5000]
    path.write_bytes(content)
    for command in ("fit", "validate"):
        code = 0
        try:
            main([command, "--config", TINY, "--data.init_args.data_dir", str(tiny_data), "--ckpt_path", str(path)])
        except SystemExit as exit_:
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2 and f"nag: error: --ckpt_path {path} is not a readable checkpoint" in err, err[-2000:]


def run(args, capsys):
    code = 0
    try:
        main(args)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def test_a_refused_callback_argument_is_one_line_not_a_traceback(tiny_data, capsys):
    code, err = run(["fit", "--config", TINY, "--data.init_args.data_dir", str(tiny_data),
                     "--trainer.callbacks+=nag_lightning.lightning.callbacks.SkipRateSchedule",
                     "--trainer.callbacks.target_rate=1.0"], capsys)
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("nag: error:")] == [
        "nag: error: SkipRateSchedule.target_rate must be in [0, 1), got 1.0. (building what the config names; "
        "fix that value in the config or on the command line)"]


@pytest.mark.parametrize("option, message", [
    ("--model.init_args.learning_rat", "unknown option 'learning_rat' for nag_lightning.LanguageModel; did you mean 'learning_rate'?"),
    ("--model.init_args.config.d_modl", "unknown option 'd_modl' for nag_lightning.model.ModelConfig; did you mean 'd_model'?"),
])
def test_a_misspelt_key_is_named_first_with_the_nearest_valid_one(option, message, capsys):
    code, err = run(["fit", "--config", TINY, option, "64"], capsys)
    assert code == 2
    assert err.splitlines()[0] == f"nag: error: {message}"


def test_a_run_killed_while_checkpointing_leaves_a_loadable_last_checkpoint(tiny_data, tmp_path):
    """SIGKILL at an arbitrary moment of a run that saves every step: last.ckpt loads and resumes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    every_step = ('[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
                  '"init_args": {"every_n_train_steps": 1, "save_last": true}}]')
    args = ["--config", TINY, "--data.init_args.data_dir", str(tiny_data), "--trainer.enable_progress_bar=false",
            "--trainer.logger=false", "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks", every_step]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    process = subprocess.Popen([sys.executable, "-m", "nag_lightning.commands.main", "fit", *args, "--trainer.max_steps", "100000"],
                               cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)  # well into a stretch of saves, one per step
    process.send_signal(signal.SIGKILL)
    process.wait()
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert step >= 1
    resumed = subprocess.run([sys.executable, "-m", "nag_lightning.commands.main", "fit", *args, "--ckpt_path", str(last),
                              "--trainer.max_steps", str(step + 2)], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"steps {step + 2}" in resumed.stdout
    assert not list(last.parent.glob(".last.tmp-*.ckpt"))  # a killed write's temporary file is gone


@pytest.mark.parametrize("damage", ["truncated chunk", "deleted index"])
def test_a_damaged_dataset_is_one_clear_error_and_prepare_rebuilds_it(damage, tiny_data, tmp_path, capsys):
    import os
    import shutil

    from conftest import TINY_CORPUS
    from nag_lightning.data.preparation import dataset_problems

    data = tmp_path / "tiny"
    shutil.copytree(tiny_data, data)
    if damage == "truncated chunk":
        chunk = sorted((data / "train").glob("*.bin"))[0]
        chunk.write_bytes(chunk.read_bytes()[:100])
    else:
        (data / "val" / "index.json").unlink()
    code, _, err = fit(["--data.init_args.data_dir", str(data), "--trainer.max_steps", "2"], tiny_data, capsys)
    rebuild = f"nag prepare --output {data} --corpus {' '.join(TINY_CORPUS)} --vocab_size 512 --val_fraction 0.2"
    assert code == 2 and "Traceback" not in err
    assert f"nag: error: Dataset folder {data} is damaged: " in err and rebuild in err, err[-2000:]
    assert ("has 100 bytes where its index records" if damage == "truncated chunk" else "val/index.json is missing") in err
    assert not Path("runs").exists()  # reported before any run folder was made
    # The same command rebuilds it (the fingerprint alone would call it up to date), and clears
    # what killed prepares left behind.
    dead, alive = tmp_path / ".tiny.tmp-999999999-abc", tmp_path / f".tiny.tmp-{os.getpid()}-abc"
    dead.mkdir(), alive.mkdir()
    code = 0
    try:
        main(rebuild.split()[1:])
    except SystemExit as exit_:
        code = exit_.code or 0
    out = capsys.readouterr().out
    assert code == 0 and "is damaged" in out and "rebuilding it" in out, out
    assert dataset_problems(data) == [] and not dead.exists() and alive.exists()


def test_a_fit_that_fails_its_input_checks_leaves_no_run_folder(tiny_data, capsys):
    code, _, err = fit(["--model.init_args.config.vocab_size", "300"], tiny_data, capsys)
    assert code == 2 and "was tokenized with a vocabulary of 512 tokens" in err, err[-2000:]
    assert not Path("runs/tiny").exists()


def test_lightning_names_for_checkpoints_still_pass_through(tiny_data, capsys, caplog, monkeypatch):
    """`--ckpt_path last` is Lightning's name for the latest last.ckpt of the run's checkpoint
    folder, not a path to check: in a new run folder there is none (Lightning starts from step 0);
    in a finished run's folder Lightning resumes from its last.ckpt."""
    import logging

    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)  # its messages, to caplog
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    resume_last = ["--trainer.val_check_interval", "4", "--ckpt_path", "last"]
    code, out, err = fit(["--trainer.max_steps", "4", *resume_last], tiny_data, capsys)
    assert code == 0, err[-2000:]
    assert "Restoring states" not in caplog.text and "| steps 4 | run runs/tiny/version_0" in out, out[-2000:]
    last = Path("runs/tiny/version_0/checkpoints/last.ckpt").resolve()
    code, out, err = fit(["--trainer.max_steps", "6", "--trainer.logger.init_args.version=version_0", *resume_last],
                         tiny_data, capsys)
    assert code == 0, err[-2000:]
    assert f"Restoring states from the checkpoint path at {last}" in caplog.text, caplog.text[-2000:]
    assert "| steps 6 |" in out and torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 6


HEAP_PROBE = """
import ctypes, json, sys
from nag_lightning.lightning.memory import resident_mb, tune_heap

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p

def resident_after_freeing(mb):
    block = libc.malloc(mb << 20)
    ctypes.memset(block, 1, mb << 20)
    libc.free(ctypes.c_void_p(block))
    return resident_mb()

tuned = tune_heap()
base = resident_mb()
kept = resident_after_freeing(100) - base  # under the trim threshold: stays on the heap
trimmed = resident_after_freeing(400) - base  # past it: handed back
print(json.dumps({"tuned": tuned, "kept": kept, "trimmed": trimmed}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
@pytest.mark.parametrize("launcher_env", [{}, {"MALLOC_ARENA_MAX": "2"}, {"MALLOC_MMAP_THRESHOLD_": "131072"}])
def test_the_heap_keeps_large_blocks_and_hands_back_past_256_mb_unless_the_launcher_chose(launcher_env):
    """100 MB freed stays resident (glibc's default would have mapped and unmapped it), 400 MB
    freed at the heap's top goes back; a launcher's own threshold leaves glibc as it is, and an
    unrelated MALLOC_* setting (MALLOC_ARENA_MAX) does not turn the tuning off."""
    import json
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    result = json.loads(subprocess.run([sys.executable, "-c", HEAP_PROBE], env=env | launcher_env, check=True,
                                       capture_output=True, text=True).stdout)
    if "MALLOC_MMAP_THRESHOLD_" in launcher_env:
        assert not result["tuned"] and result["kept"] < 10  # glibc mapped the 100 MB block and unmapped it
    else:
        assert result["tuned"] and 90 < result["kept"] < 110
    assert result["trimmed"] < 10


def test_resident_set_is_read_from_proc():
    """In MB, the kernel's own count (VmRSS), and 64 MB of freshly touched pages add 64 MB."""
    import mmap

    from nag_lightning.lightning.memory import resident_mb

    def vm_rss_mb():
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024

    assert resident_mb() == pytest.approx(vm_rss_mb(), abs=2.0)
    size = 64 * 2**20
    block = mmap.mmap(-1, size)  # new pages, whatever the C heap keeps free
    before = resident_mb()
    for offset in range(0, size, mmap.PAGESIZE):
        block[offset] = 1
    grown = resident_mb() - before
    block.close()
    assert grown == pytest.approx(64.0, abs=3.0)
