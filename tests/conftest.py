import os
import shutil
import subprocess
import sys
import sysconfig
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, Triton kernels run (on CPU tensors) only under the interpreter, which must be
# chosen before `import triton`. With a GPU the compiled kernels are tested instead: the
# interpreter would otherwise run the GPU tests too, on copies, and fail them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `python -m pytest` puts the working directory on sys.path: at the repository root, its kernels/
# folder (installed as nag_lightning.kernels) would shadow the PyPI `kernels` that transformers
# imports. The package itself is imported through its installation, never from the root.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parents[1]]

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# A small slice of real text, present on every machine: a few standard-library packages.
TINY_CORPUS = [str(STDLIB / "json"), str(STDLIB / "email" / "*.py"), str(STDLIB / "argparse.py")]
TINY_VOCAB = 512
REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "configs" / "tiny.yaml")
NAG_OVERLAY = str(REPO / "configs" / "residual" / "nag.yaml")


def _work_tree_changes() -> set[str] | None:
    """`git status --porcelain` lines of the repository (ignored files excluded); None outside git."""
    try:
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO,
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(status.stdout.splitlines()) if status.returncode == 0 else None


def pytest_sessionstart(session):
    session.config._tree_before = _work_tree_changes()


def pytest_sessionfinish(session, exitstatus):
    """The suite fails if it left anything in the work tree (tests run in temporary folders)."""
    before = getattr(session.config, "_tree_before", None)
    after = _work_tree_changes()
    if before is None or after is None or getattr(session.config, "workerinput", None) is not None:
        return
    left = sorted(after - before)
    if left:
        print("\nThe test suite changed the work tree (tests must write only to temporary folders):\n  "
              + "\n  ".join(left))
        session.exitstatus = 1


@pytest.fixture(autouse=True)
def _run_in_a_temporary_folder(tmp_path, monkeypatch):
    """Every test starts in its own temporary folder, so nothing a tool writes to the working
    directory (LightningCLI's config.yaml, runs/, data/) lands in the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A dataset folder built once per session by the real `prepare`."""
    from nag_lightning.data import PrepareSettings, prepare

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare(out, PrepareSettings(TINY_CORPUS, vocab_size=TINY_VOCAB, val_fraction=0.2), log=lambda *_: None)
    return out


def tiny_model_config(**overrides):
    from nag_lightning.model import ModelConfig

    values = dict(vocab_size=TINY_VOCAB, context_length=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
    values.update(overrides)
    return ModelConfig(**values)


def without_interpreter(script: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a Python process without ``TRITON_INTERPRET``: Triton's compiler and
    torch's tracing of Triton kernels need the kernels as Triton functions, not the Python ones the
    interpreter makes of them. Skips the test where Triton is not installed."""
    from nag_lightning.kernels._triton import HAS_TRITON

    if not HAS_TRITON:
        pytest.skip("Triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)


def nag(*args):
    """(exit code, stdout, stderr) of `nag ARGS` in this process."""
    from nag_lightning.commands.main import main

    out, err, code = StringIO(), StringIO(), 0
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI reads sys.argv too: only these arguments
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exit_:
            code = exit_.code or 0
        finally:
            sys.argv = argv
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_data, tmp_path_factory):
    """Last checkpoints of a short pre-norm and a short NAG run of the tiny config, copied away
    from their run (shared by the generation and export tests)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    checkpoints = {}
    for name, overlays in (("prenorm", []), ("nag", ["--config", NAG_OVERLAY])):
        code, _, err = nag("fit", "--config", TINY, *overlays, "--data.init_args.data_dir", str(tiny_data),
                           "--trainer.logger.init_args.save_dir", str(folder / name), "--trainer.max_steps", "10",
                           "--trainer.enable_progress_bar", "false")
        assert code == 0, err
        checkpoints[name] = folder / f"{name}.ckpt"
        shutil.copy(next((folder / name).rglob("last.ckpt")), checkpoints[name])
    return checkpoints
