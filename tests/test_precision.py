"""``precision: auto``: chosen by the hardware that runs the command, said in one line."""

import pytest
import yaml

from conftest import REPO
from nag_lightning.lightning import precision
from nag_lightning.lightning.precision import cpu_native_bf16, precision_on_this_machine, resolve_precision

NO_BF16 = (False, "this CPU has no native bf16 (no avx512_bf16 or AMX)")
BF16 = (True, "this CPU has native bf16 (avx512_bf16)")


@pytest.mark.parametrize("flags, native", [({"avx2", "fma"}, False), ({"avx2", "avx512_bf16"}, True),
                                           ({"amx_bf16", "amx_tile"}, True)])
def test_x86_flags_decide_native_bf16(flags, native):
    assert cpu_native_bf16(flags, machine="x86_64")[0] is native


def test_elsewhere_a_measured_matmul_decides(monkeypatch):
    monkeypatch.setattr(precision, "bf16_matmul_slowdown", lambda: 0.6)
    assert cpu_native_bf16(set(), machine="aarch64") == (True, "a bf16 matmul measured 1.7x as fast as float32 on this CPU")
    monkeypatch.setattr(precision, "bf16_matmul_slowdown", lambda: 180.0)
    assert cpu_native_bf16(None, machine="aarch64") == (False, "a bf16 matmul measured 180x slower than float32 on this CPU")


def test_auto_resolves_by_device():
    cpu = dict(cuda_available=False, slowdown=250)
    assert resolve_precision("auto", "cpu", cpu_bf16=BF16, **cpu) == (
        "bf16-mixed", "precision: bf16-mixed (this CPU has native bf16 (avx512_bf16))")
    assert resolve_precision("auto", "auto", cpu_bf16=NO_BF16, **cpu) == (
        "32-true", "precision: 32-true (this CPU has no native bf16 (no avx512_bf16 or AMX); bf16 matmuls would be "
                   "~250x slower)")
    assert resolve_precision("auto", "auto", cuda_available=True, cuda_bf16=True)[0] == "bf16-mixed"
    assert resolve_precision("auto", "gpu", cuda_bf16=False) == ("16-mixed", "precision: 16-mixed (this GPU has no bf16)")
    # accelerator: cpu wins over a GPU that is present
    assert resolve_precision("auto", "cpu", cuda_available=True, cpu_bf16=NO_BF16, slowdown=250)[0] == "32-true"


def test_an_explicit_precision_wins_and_bf16_on_an_emulating_cpu_warns():
    assert resolve_precision("32-true", "cpu", cpu_bf16=BF16) == ("32-true", None)
    assert resolve_precision("bf16-mixed", "cpu", cpu_bf16=BF16) == ("bf16-mixed", None)
    assert resolve_precision("bf16-mixed", "auto", cuda_available=True) == ("bf16-mixed", None)
    chosen, warning = resolve_precision("bf16-mixed", "cpu", cpu_bf16=NO_BF16, slowdown=243)
    assert chosen == "bf16-mixed" and "~243x slower than float32" in warning and "precision: auto" in warning


def test_the_trainer_resolves_auto_and_warns_once_for_emulated_bf16(monkeypatch, capsys):
    from nag_lightning.lightning.cli import NagTrainer

    monkeypatch.setattr(precision, "cpu_native_bf16", lambda *a, **k: NO_BF16)
    monkeypatch.setattr(precision, "bf16_matmul_slowdown", lambda: 250.0)
    monkeypatch.setattr(precision, "_said", set())
    trainer = NagTrainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    assert trainer.precision == "32-true"
    assert "precision: 32-true (this CPU has no native bf16" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="250x slower"):
        assert NagTrainer(accelerator="cpu", precision="bf16-mixed", logger=False).precision == "bf16-mixed"


def test_a_bf16_checkpoint_runs_in_float32_on_an_emulating_cpu(monkeypatch):
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda *a, **k: NO_BF16)
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: False)
    assert precision_on_this_machine("bf16-mixed") == "32-true"
    assert precision_on_this_machine("32-true") == "32-true"
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda *a, **k: BF16)
    assert precision_on_this_machine("bf16-mixed") == "bf16-mixed"


def test_every_shipped_config_says_auto_and_resolves():
    from nag_lightning.commands.runs import instantiate

    top_level = [path for path in sorted((REPO / "configs").rglob("*.yaml"))
                 if "precision" in (yaml.safe_load(path.read_text()).get("trainer") or {})]
    auto = [path for path in top_level if yaml.safe_load(path.read_text())["trainer"]["precision"] == "auto"]
    assert {p.name for p in top_level} - {p.name for p in auto} == {"32-true.yaml", "bf16-mixed.yaml", "16-mixed.yaml"}
    expected = {resolve_precision("auto", "auto")[0]}
    for path in auto:
        assert instantiate([str(path)]).precision in expected, path
