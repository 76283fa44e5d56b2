"""The Hugging Face model (interop/modeling_nag.py) computes what the package's Transformer does:
logits of every residual strategy, skipping, greedy generation and a save/load round trip."""

import ast
import json
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")


import torch

from conftest import tiny_model_config
from nag_lightning.interop import modeling_nag
from nag_lightning.interop.hf import AUTO_MAP, hf_config, save_hf_folder, to_hf
from nag_lightning.interop.modeling_nag import NagLightningConfig, NagLightningForCausalLM
from nag_lightning.model import Transformer
from nag_lightning.model.generation import sample_tokens
from nag_lightning.model.residual import (NAG, DeepNorm, LayerNormScaling, LayerScale, NAGFixedBeta,
                                          NAGNoCentring, NAGNoGate, NAGNoOrthogonalisation, OrthogonalUpdate,
                                          PostNorm, PreNorm, ReZero)
from nag_lightning.model.skip_policy import SkipConfig

VOCAB = 64
STRATEGIES = {
    "prenorm": PreNorm, "postnorm": PostNorm, "layernorm_scaling": LayerNormScaling,
    "orthogonal": OrthogonalUpdate, "deepnorm": DeepNorm, "rezero": ReZero, "layerscale": LayerScale,
    "nag": NAG, "nag_no_gate": NAGNoGate, "nag_fixed_beta": NAGFixedBeta, "nag_no_centring": NAGNoCentring,
    "nag_no_orthogonalisation": NAGNoOrthogonalisation,
}


def build(residual, seed=0, **overrides):
    """A float32 package model whose every parameter is moved off its initial value (ReZero's
    zero alpha or NAG's unit gains would otherwise hide a wrong formula)."""
    torch.manual_seed(seed)
    # A larger init than training's: logits far apart, so greedy decoding has no near-ties.
    values = {"vocab_size": VOCAB, "residual": residual, "init_std": 0.3}
    model = Transformer(tiny_model_config(**{**values, **overrides})).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def tokens(batch, seq, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def calibrated(model, rate=0.3, batch=None):
    """Set ``model``'s thresholds (and capacities) to skip about ``rate`` of ``batch``'s pairs."""
    batch = tokens(4, 32) if batch is None else batch
    with torch.no_grad():
        out = model(batch, return_record=True, calibrate=rate)
    model.skip_policy.calibrate_from(out.record, rate)
    assert model.skip_policy.active
    return model


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_gives_the_package_logits(name):
    model = build(STRATEGIES[name]())
    hf = to_hf(model)
    assert list(hf.model.state_dict()) == list(model.state_dict())
    x = tokens(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=0, atol=1e-5)
    assert hf.last_skip_rate is None


@pytest.mark.parametrize("skip", [{}, {"rule": "gate", "threshold_scope": "per_layer"},
                                  {"rule": "abs_step", "mode": "capacity"}], ids=["step", "gate_per_layer", "capacity"])
def test_skipping_gives_the_package_logits_and_skip_rate(skip):
    model = calibrated(build(NAG(), skip=SkipConfig(**skip)))
    if skip.get("mode") == "capacity":
        model.skip_policy.set_capacity_shares([0.4] * 4)  # 16 of 32 tokens per sequence: the capacity binds
    hf = to_hf(model, skip_enabled=True)
    dense = to_hf(model)
    x = tokens(4, 32)  # the calibration batch: about 30% of its pairs are below the thresholds
    with torch.no_grad():
        out = model(x, return_record=True)
        torch.testing.assert_close(hf(x).logits, out.logits, rtol=0, atol=1e-5)
        dense_logits = dense(x).logits
    package_rate = float(out.record.stats().skip_rate)
    assert hf.last_skip_rate == pytest.approx(package_rate, abs=1e-9)
    if skip.get("mode") == "capacity":
        assert out.record.over_capacity_fraction() > 0.1 and hf.last_skip_rate > 0.4
    else:
        assert hf.last_skip_rate == pytest.approx(0.3, abs=0.05)
    assert dense.last_skip_rate is None
    assert (dense_logits - out.logits).abs().max() > 1e-3  # skipping did change the logits


def test_skipping_with_unreproducible_rules_or_without_a_gate_is_refused():
    for rule in ("random", "last_layers"):
        with pytest.raises(ValueError, match=rule):
            to_hf(build(NAG(), skip=SkipConfig(rule=rule)), skip_enabled=True)
        to_hf(build(NAG(), skip=SkipConfig(rule=rule)))  # dense: fine
    with pytest.raises(ValueError, match="PreNorm has no gate"):
        to_hf(build(PreNorm()), skip_enabled=True)
    config = hf_config(build(PreNorm()).config)
    config.nag_config["residual"] = {"class_path": "somewhere.Unknown", "init_args": {}}
    with pytest.raises(ValueError, match="Unknown residual strategy.*NAG.*PreNorm"):
        NagLightningForCausalLM(config)


@pytest.mark.parametrize("name,skipping", [("prenorm", False), ("nag", False), ("nag", True)])
def test_greedy_generation_matches_the_package(name, skipping):
    model = build(STRATEGIES[name]())
    if skipping:
        calibrated(model)
    hf = to_hf(model, skip_enabled=skipping)
    prompt = tokens(2, 8, seed=2)
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=12, temperature=0)
        got = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)


def test_left_padded_batch_generation_matches_each_prompt():
    model = calibrated(build(NAG()))
    hf = to_hf(model, skip_enabled=True)
    prompts = [tokens(1, 9, seed=3)[0].tolist(), tokens(1, 5, seed=4)[0].tolist()]
    with torch.no_grad():
        expected = torch.stack(list(sample_tokens(model, prompts, 10, temperature=0)), dim=1)
        ids = torch.tensor([prompts[0], [0] * 4 + prompts[1]])
        mask = torch.tensor([[1] * 9, [0] * 4 + [1] * 5])
        got = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(got[:, 9:], expected)


def test_loss_is_the_shifted_cross_entropy():
    hf = to_hf(build(NAG()))
    x = tokens(2, 16)
    labels = x.clone()
    labels[0, 5] = -100
    with torch.no_grad():
        out = hf(x, labels=labels)
        logits = out.logits
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        torch.testing.assert_close(out.loss, expected)
        assert torch.equal(hf(x, return_dict=False, use_cache=False)[0], logits)


@pytest.mark.parametrize("name,skipping,tied", [("nag", True, True), ("prenorm", False, False)])
def test_saved_folder_loads_with_remote_code(tmp_path, monkeypatch, name, skipping, tied):
    # Remote code is imported from a modules cache: this test's own, not the user's.
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    model = build(STRATEGIES[name](), tie_embeddings=tied)
    if skipping:
        calibrated(model)
    folder = save_hf_folder(model, tmp_path / f"export_{name}", skip_enabled=skipping)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["nag_config"] == model.config.to_dict()
    assert (folder / "model.safetensors").is_file()
    assert (folder / "modeling_nag.py").read_text() == Path(modeling_nag.__file__).read_text()

    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(loaded).__module__ != modeling_nag.__name__  # the folder's copy, not this package's
    assert (loaded.model.head.weight is loaded.model.embed.weight) == tied
    x = tokens(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x), rtol=0, atol=1e-5)
    assert loaded.last_skip_rate == (pytest.approx(float(model(x, return_record=True).record.stats().skip_rate))
                                     if skipping else None)


def test_the_modeling_file_needs_only_torch_and_transformers():
    tree = ast.parse(Path(modeling_nag.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported - set(sys.stdlib_module_names) == {"torch", "transformers"}


def test_a_config_without_arguments_is_the_package_default():
    config = NagLightningConfig()
    assert (config.vocab_size, config.num_hidden_layers, config.tie_word_embeddings) == (8192, 4, True)
    assert config.nag_config["n_kv_heads"] == 4 and config.skip_enabled is False
