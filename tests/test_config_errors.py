"""One-line causes of a refused config, found from the settings given (config_errors.py)."""

from __future__ import annotations

import pytest

from conftest import REPO, TINY
from nag_lightning.lightning.config_errors import given_settings, refused_setting


def test_settings_are_read_from_config_files_and_arguments_later_winning(tmp_path):
    overlay = tmp_path / "o.yaml"
    overlay.write_text("model:\n  init_args:\n    config:\n      n_layers: 3\n")
    settings = given_settings(["fit", "--config", TINY, f"--config={overlay}", "--model.init_args.config.d_model=48",
                               "--trainer.max_steps", "5"])
    assert settings["model.init_args.config.n_layers"] == 3  # the overlay's, over tiny.yaml's 2
    assert settings["model.init_args.config.d_model"] == 48 and settings["trainer.max_steps"] == 5
    assert settings["model.class_path"] == "nag_lightning.LanguageModel"


@pytest.mark.parametrize("extra, line", [
    (["--model.init_args.config.n_layers", "eight"],
     "nag_lightning.model.ModelConfig.n_layers needs a value of type int, got 'eight'"),
    (["--model.init_args.config.mlp_ratio", "[1]"], None),  # a list for a float: the parser's own message
    (["--model.init_args.config.mlp_ratio", "3"], None),  # an int is a float
    (["--model.init_args.config.n_kv_heads", "null"], None),  # int | None
    (["--model.init_args.config.skip.mode", "true"],
     "nag_lightning.model.skip_policy.SkipConfig.mode needs a value of type str, got True"),
    (["--model.init_args.config.residual", "nag_lightning.model.residual.NAG",
      "--model.init_args.config.residual.init_args.gate_direction", "8"],
     "unknown option 'gate_direction' for nag_lightning.model.residual.NAG; did you mean 'gate_directions'?"),
    (["--config", str(REPO / "configs/residual/nag.yaml"), "--model.init_args.config.residual.init_args.alpha_powr", "1"],
     "unknown option 'alpha_powr' for nag_lightning.model.residual.NAG; did you mean 'alpha_power'?"),
    (["--data.init_args.batch_sise", "4"],
     "unknown option 'batch_sise' for nag_lightning.TokenShardDataModule; did you mean 'batch_size'?"),
    (["--trainer.max_stepz", "4"], None),  # the Trainer's own options: the parser's message
    (["--data.init_args.data_dir", "2024"], None),  # a number where text goes is that text
    (["--print_config", "--model.init_args.config.n_layers", "eight"],  # a flag without a value
     "nag_lightning.model.ModelConfig.n_layers needs a value of type int, got 'eight'"),
])
def test_a_refused_setting_is_named_with_its_fix(extra, line):
    assert refused_setting(["fit", "--config", TINY, *extra]) == (line and line + (
        ": fix it in the config or on the command line" if "needs a value" in line else ""))
