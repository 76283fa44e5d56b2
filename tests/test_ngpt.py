"""nGPT's residual: the stream stays on the sphere, each write is the paper's update (float64),
and the matrices stay unit-norm along the model dimension through training."""

from __future__ import annotations

import math

import torch

from nag_lightning.model import ModelConfig, Transformer
from nag_lightning.model.residual import NGPT


def tiny(**kwargs) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=2, n_heads=4,
                                   residual=NGPT(**kwargs)))


def unit_norm_errors(model: Transformer) -> list[float]:
    writers = {id(b.attn.out_proj) for b in model.blocks} | {id(b.mlp.down_proj) for b in model.blocks}
    return [(m.weight.norm(dim=0 if id(m) in writers else 1) - 1).abs().max().item()
            for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]


def test_a_write_is_the_papers_update_on_the_sphere_in_float64():
    strategy = NGPT(alpha_init=0.05)
    strategy.bind(d_model=8, n_sublayers=2, eps=1e-12)
    strategy.bind_head(10)
    strategy.double()
    with torch.no_grad():
        strategy.alpha.uniform_(0.1, 0.5)
    h = strategy.enter(torch.randn(3, 5, 8, dtype=torch.float64)).double()
    update = torch.randn(3, 5, 8, dtype=torch.float64)
    alpha = strategy.alpha[1] * (0.05 * math.sqrt(8))
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    expected = unit(unit(h) + alpha * (unit(update) - unit(h))) * math.sqrt(8)
    torch.testing.assert_close(strategy.write(h, update, 2, None), expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(expected.pow(2).mean(-1), torch.ones(3, 5, dtype=torch.float64))


def test_eigen_rates_and_logit_scale_start_at_their_init_values():
    model = tiny(alpha_init=0.07, logit_scale_init=2.0)
    torch.testing.assert_close(model.residual.eigen_rates(3), torch.full((32,), 0.07))
    head = model.head
    h = model.residual.enter(torch.randn(1, 4, 32))
    cosines = head(h / math.sqrt(32))
    torch.testing.assert_close(model.residual.logits(h, head), 2.0 * cosines)
    assert cosines.abs().max() <= 1 + 1e-5  # unit rows against unit streams


def test_matrices_start_and_stay_unit_norm_through_training_and_in_every_checkpoint(tiny_data, tmp_path):
    """Through the real Trainer: every step's checkpoint (saved by a callback, after the step)
    holds matrices back on the sphere, and the steps did move them off it."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from nag_lightning.data import TokenShardDataModule
    from nag_lightning.lightning.lit_module import LanguageModel

    config = ModelConfig(vocab_size=512, context_length=32, d_model=32, n_layers=2, n_heads=4, residual=NGPT())
    module = LanguageModel(config, learning_rate=0.01, warmup_steps=0, weight_decay=0.0)
    assert max(unit_norm_errors(module.model)) < 1e-5
    before = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         default_root_dir=tmp_path,
                         callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1,
                                                    filename="{step}")])
    trainer.fit(module, datamodule=TokenShardDataModule(str(tiny_data), context_length=32, batch_size=4))
    assert any(not torch.equal(before[n], p) for n, p in module.model.named_parameters())
    for step in (1, 2, 3):
        saved = torch.load(tmp_path / f"step={step}.ckpt", map_location="cpu", weights_only=True)["state_dict"]
        model = Transformer(config)
        model.load_state_dict({k.removeprefix("model."): v for k, v in saved.items()})
        assert max(unit_norm_errors(model)) < 1e-5, step


def test_the_stream_stays_on_the_sphere_and_the_model_is_causal():
    model = tiny()
    tokens = torch.randint(0, 64, (2, 12))
    out = model(tokens, return_stats=True)
    for layer in range(1, 5):
        rms = out.stats[f"residual/rms/layer_{layer:02d}"]
        torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-4, atol=1e-4)
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 64
    torch.testing.assert_close(model(changed)[:, :8], out.logits[:, :8])


def test_attention_compares_normalised_queries_and_keys_scaled_by_s_qk_at_softmax_scale_sqrt_h():
    """nGPT's attention in float64, by hand: per head, q and k unit-norm after the rotary
    embedding, times s_qk; softmax(sqrt(h) q.k) over the causal past. Grouped keys (fewer key
    heads) get their own s_qk. Scaling the projections changes nothing (only directions count)."""
    from nag_lightning.model.transformer import apply_rope

    for kv_heads in (4, 2):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=1, n_heads=4,
                                        n_kv_heads=kv_heads, residual=NGPT())).double()
        attention = model.blocks[0].attn
        assert (attention.key_scale is None) == (kv_heads == 4)
        with torch.no_grad():
            attention.query_scale.uniform_(0.1, 0.3)
            if attention.key_scale is not None:
                attention.key_scale.uniform_(0.1, 0.3)
        x = torch.randn(2, 7, 32, dtype=torch.float64)
        cos, sin = model.rope_cos[:7].double(), model.rope_sin[:7].double()
        q = apply_rope(attention.q_proj(x).view(2, 7, 4, 8).transpose(1, 2), cos, sin)
        k, v = attention.kv_proj(x).view(2, 7, 2, kv_heads, 8).permute(2, 0, 3, 1, 4)
        k = apply_rope(k, cos, sin)
        s_q = attention.query_scale * math.sqrt(32)
        s_k = (attention.query_scale if attention.key_scale is None else attention.key_scale) * math.sqrt(32)
        q = q / q.norm(dim=-1, keepdim=True) * s_q
        k = (k / k.norm(dim=-1, keepdim=True) * s_k).repeat_interleave(4 // kv_heads, dim=1)
        v = v.repeat_interleave(4 // kv_heads, dim=1)
        scores = (q @ k.transpose(-1, -2)) * math.sqrt(8)
        scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
        expected = attention.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 32))
        # SDPA's CPU kernel agrees with this float64 arithmetic to ~1e-7 (measured 7.8e-8), not 1e-15;
        # a wrong scale or a missing normalisation moves the output by 1e-2 or more.
        tolerance = dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(attention(x, cos, sin), expected, **tolerance)
        with torch.no_grad():
            attention.q_proj.weight.mul_(3.0)
            attention.kv_proj.weight[: kv_heads * 8].mul_(0.5)  # the keys' rows
        torch.testing.assert_close(attention(x, cos, sin), expected, **tolerance)


def test_the_mlp_scales_its_gate_by_s_v_and_its_other_input_by_s_u_and_silu_sees_inputs_of_order_1():
    """The paper scales the gate by s_v sqrt(d) for a stream of norm 1; NGPT's stream has norm
    sqrt(d), so s_v alone keeps SiLU's input of order 1 at initialisation (not sqrt(d))."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=1, n_heads=4,
                                    residual=NGPT())).double()
    mlp = model.blocks[0].mlp
    with torch.no_grad():
        mlp.gate_scale.uniform_(0.5, 1.5)
        mlp.up_scale.uniform_(0.5, 1.5)
    x = torch.randn(3, 32, dtype=torch.float64)
    gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
    expected = mlp.down_proj(torch.nn.functional.silu(gate * mlp.gate_scale) * up * mlp.up_scale)
    torch.testing.assert_close(mlp(x), expected, rtol=1e-12, atol=1e-12)
    wide = Transformer(ModelConfig(vocab_size=64, context_length=16, d_model=256, n_layers=1, n_heads=4,
                                   residual=NGPT()))
    stream = wide.residual.enter(torch.randn(4, 16, 256))  # on the sphere of radius sqrt(d)
    gate, _ = wide.blocks[0].mlp.gate_up_proj(stream).chunk(2, dim=-1)
    assert 0.5 < (gate * wide.blocks[0].mlp.gate_scale).std().item() < 2.0
    # Other strategies' sub-layers have none of these parameters.
    plain = Transformer(ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=1, n_heads=4))
    assert not any("scale" in name for name, _ in plain.blocks.named_parameters())


def test_a_checkpoint_from_before_the_normalised_sub_layers_is_refused_with_a_sentence_saying_so():
    import pytest

    model = tiny()
    old = {k: v for k, v in model.state_dict().items() if not k.endswith(("query_scale", "gate_scale", "up_scale"))}
    with pytest.raises(RuntimeError, match="predates nGPT's normalised attention and MLP scales"):
        tiny().load_state_dict(old)
    tiny().load_state_dict(model.state_dict())  # a current one loads
