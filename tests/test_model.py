"""The pure-PyTorch decoder: configuration checks, causality, RoPE, GQA, loss at init, overfitting."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model_config
from nag_lightning.model import ConfigError, ModelConfig, Transformer
from nag_lightning.model.transformer import apply_rope, rope_tables


@pytest.mark.parametrize(
    "fields, named",
    [
        (dict(d_model=30, n_heads=4), ["d_model", "n_heads"]),
        (dict(n_heads=4, n_kv_heads=3), ["n_heads", "n_kv_heads"]),
        (dict(n_layers=0), ["n_layers"]),
        (dict(dropout=1.5), ["dropout"]),
    ],
)
def test_invalid_config_names_the_fields(fields, named):
    with pytest.raises(ConfigError) as error:
        Transformer(ModelConfig(**fields))
    for field in named:
        assert field in str(error.value)


def test_model_package_does_not_import_lightning():
    code = "import sys, nag_lightning.model; assert not any(m.startswith(('lightning', 'pytorch_lightning')) for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_causality():
    torch.manual_seed(0)
    model = Transformer(tiny_model_config()).eval()
    tokens = torch.randint(0, 512, (2, 24))
    changed = tokens.clone()
    changed[:, 15:] = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_loss_at_init_is_close_to_uniform():
    torch.manual_seed(0)
    config = tiny_model_config()
    model = Transformer(config)
    tokens = torch.randint(0, config.vocab_size, (4, 33))
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert abs(loss.item() - math.log(config.vocab_size)) < 0.1


def test_overfits_one_batch():
    torch.manual_seed(0)
    config = tiny_model_config()
    model = Transformer(config)
    tokens = torch.randint(0, config.vocab_size, (2, 33))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


def test_rope_is_a_rotation_whose_scores_depend_on_relative_position():
    head_dim, length = 8, 16
    cos, sin = rope_tables(head_dim, length, 10000.0)
    q = torch.randn(head_dim, dtype=torch.float32).expand(1, 1, length, head_dim)
    k = torch.randn(head_dim, dtype=torch.float32).expand(1, 1, length, head_dim)
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    scores = rq[0, 0] @ rk[0, 0].T  # same vectors at every position: a score depends on i - j only
    torch.testing.assert_close(scores[5, 2], scores[12, 9], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores[3, 3], (q[0, 0, 0] * k[0, 0, 0]).sum(), rtol=1e-5, atol=1e-5)


def test_gqa_shapes():
    config = tiny_model_config(d_model=64, n_heads=8, n_kv_heads=2)
    model = Transformer(config)
    attn = model.blocks[0].attn
    assert attn.q_proj.weight.shape == (8 * 8, 64)
    assert attn.kv_proj.weight.shape == (2 * 2 * 8, 64)
    assert model(torch.randint(0, config.vocab_size, (3, 10))).shape == (3, 10, config.vocab_size)


def test_gqa_equals_attention_with_repeated_kv_heads():
    torch.manual_seed(0)
    config = tiny_model_config(d_model=32, n_heads=4, n_kv_heads=2)
    attn = Transformer(config).blocks[0].attn
    x = torch.randn(2, 7, 32)
    cos, sin = rope_tables(config.head_dim, 7, config.rope_theta)
    q = apply_rope(attn.q_proj(x).view(2, 7, 4, 8).transpose(1, 2), cos, sin)
    k, v = attn.kv_proj(x).view(2, 7, 2, 2, 8).permute(2, 0, 3, 1, 4)
    k = apply_rope(k, cos, sin).repeat_interleave(2, dim=1)
    v = v.repeat_interleave(2, dim=1)
    expected = attn.out_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(attn(x, cos, sin), expected)


def test_tied_and_untied_heads():
    tied = Transformer(tiny_model_config(tie_embeddings=True))
    untied = Transformer(tiny_model_config(tie_embeddings=False))
    assert tied.head.weight is tied.embed.weight
    assert untied.head.weight is not untied.embed.weight
    assert untied.num_parameters() == tied.num_parameters() + 512 * 32


def test_sequence_longer_than_context_is_rejected():
    model = Transformer(tiny_model_config(context_length=8))
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros(1, 9, dtype=torch.long))
