"""Shipped configs compose their overlays (`config: [A, B]`) instead of copying them, with the
merge rules of repeated --config."""

from __future__ import annotations

import pytest

from conftest import REPO
from nag_lightning.commands.main import main
from nag_lightning.commands.runs import instantiate
from nag_lightning.lightning.cli import with_composed_configs

CONFIGS = REPO / "configs"


def printed_config(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *args, "--print_config"])
    assert exit_.value.code in (0, None)
    return capsys.readouterr().out


def test_nag_yaml_is_the_quickstart_with_the_nag_overlay(capsys, tmp_path):
    warmup = tmp_path / "warmup.yaml"
    warmup.write_text("model:\n  init_args:\n    config:\n      residual:\n        class_path: "
                      "nag_lightning.model.residual.NAG\n        init_args:\n          alpha_warmup_steps: 60\n"
                      "trainer:\n  logger:\n    init_args:\n      name: nag\n")
    by_hand = printed_config(["--config", str(CONFIGS / "quickstart.yaml"), "--config",
                              str(CONFIGS / "residual/nag.yaml"), "--config", str(warmup)], capsys)
    composed = printed_config(["--config", str(CONFIGS / "nag.yaml")], capsys)
    assert composed == by_hand
    assert "class_path: nag_lightning.model.residual.NAG" in composed and "max_steps: 600" in composed


def test_nag_mod_composes_nag_and_keeps_its_own_callbacks(capsys):
    composed = printed_config(["--config", str(CONFIGS / "nag_mod.yaml")], capsys)
    assert "alpha_warmup_steps: 60" in composed and "name: nag_mod" in composed
    assert composed.count("class_path: nag_lightning.lightning.callbacks.SkipRate") == 2
    assert with_composed_configs(["fit", f"--config={CONFIGS / 'nag_mod.yaml'}", "-c", "x.yaml"]) == [
        "fit", *(arg for name in ("quickstart", "residual/nag", "nag", "nag_mod")
                 for arg in ("--config", str(CONFIGS / f"{name}.yaml"))), "--config", "x.yaml"]


def test_commands_that_load_configs_compose_them_too():
    loaded = instantiate([str(CONFIGS / "nag_mod.yaml")], ["--model.init_args.config.n_layers", "1",
                                                           "--model.init_args.config.d_model", "32"])
    assert type(loaded.model.model.residual).__name__ == "NAG"
    assert loaded.model.model.residual.alpha_warmup_steps == 60


@pytest.mark.parametrize("content, message", [
    ("config: [loop.yaml]\n", "config files include each other in a circle"),
    ("config: quickstart.yaml\n", "`config:` must be a list of config files, e.g. `config: [quickstart.yaml]`"),
    ("config: [missing.yaml]\n", "lists 'missing.yaml' under `config:`, which is not a file"),
])
def test_a_bad_composition_is_one_line_naming_the_fix(content, message, tmp_path, capsys):
    (tmp_path / "loop.yaml").write_text(content)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(tmp_path / "loop.yaml")])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
