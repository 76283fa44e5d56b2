"""What a user installs: the wheel, installed non-editably into a fresh environment, imports the
whole package and trains a few steps through its `nag` console script from outside the repository."""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import REPO, TINY_CORPUS


def run(*args, cwd, env=None):
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, f"{args}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout:
        return [p for p in listed.stdout.split("\0") if p and (REPO / p).is_file()]
    return [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and ".venv" not in p.parts]


def test_the_wheel_installs_and_trains_outside_the_repository(tmp_path):
    source = tmp_path / "source"  # a copy, so building leaves nothing in the work tree
    for name in tracked_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "dist", source, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("nag_lightning-*.whl"))

    # A fresh environment without the editable install; the dependencies come from this one's
    # site-packages through a path entry (whose own .pth files, the editable finder's among
    # them, are not processed there).
    env_dir = tmp_path / "env"
    run(sys.executable, "-m", "venv", "--without-pip", env_dir, cwd=tmp_path)
    python = env_dir / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_test_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    located = run(python, "-c", "import nag_lightning, nag_lightning.model.residual, nag_lightning.kernels, "
                  "nag_lightning.lightning.lit_module; print(nag_lightning.__file__)", cwd=outside).stdout.strip()
    assert Path(located).is_relative_to(env_dir), located

    nag = env_dir / "bin" / "nag"
    run(nag, "prepare", "--output", "data/tiny", "--corpus", *TINY_CORPUS, "--vocab_size", "512", cwd=outside)
    shutil.copy(REPO / "tests/configs/tiny.yaml", outside / "tiny.yaml")
    fit = run(nag, "fit", "--config", "tiny.yaml", "--config", REPO / "configs/residual/nag.yaml",
              "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", cwd=outside)
    assert "nag fit done:" in fit.stdout
    assert (outside / "runs/nag/version_0/checkpoints/last.ckpt").is_file()
    # Text in, text out from the installed command, the dataset moved away (the checkpoint carries its tokenizer).
    shutil.move(outside / "data", tmp_path / "moved_data")
    generated = run(nag, "generate", "--ckpt_path", "runs/nag/version_0/checkpoints/last.ckpt", "--prompt", "def ",
                    "--max_new_tokens", "5", "--skip_rate", "0.25", cwd=outside)
    assert generated.stdout.startswith("def ") and "nag generate: 1 prompt(s)" in generated.stderr
