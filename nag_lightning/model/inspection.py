"""What a model looks like inside: attention sinks, massive activations and heavy tails, per sub-layer.

``inspect_model(model, tokens)`` runs one gradient-free, eager forward and returns TensorBoard tag
-> scalar tensor (sub-layer ``XX`` numbered like every other per-layer tag, ``layer_01`` = block 1's
attention, ``layer_02`` its MLP):

- ``inspect/sink_score/layer_XX`` (attention sub-layers): the attention weight a query gives the
  first token, averaged over heads and over the queries at positions >= 1 (position 0 can only
  attend to itself), whether or not they execute the sub-layer.
- ``inspect/massive/residual/layer_XX``: max |R| / median |R| over every element of the full
  residual R after sub-layer XX; ``inspect/massive/output/layer_XX``: the same of the sub-layer's
  output (what it hands the residual strategy), over the tokens that executed it (NaN when none did).
- ``inspect/kurtosis/residual/layer_XX``, ``inspect/kurtosis/output/layer_XX``: the excess
  kurtosis of those same elements (0 for a Gaussian; large for heavy tails, which int8 rounds badly).
- ``inspect/kurtosis/weight/layer_XX``: the largest excess kurtosis among the sub-layer's weight
  matrices (``weight_kurtosis`` has each one).
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn

from nag_lightning.model.residual.base import layer_tag


def excess_kurtosis(x: torch.Tensor) -> torch.Tensor:
    """E[(x - mean)^4] / var^2 - 3 over every element (population moments, as scipy's default), in
    float32 or, for float64 input, float64 (torch's sums are pairwise: float32 is ample for a diagnostic)."""
    x = x.detach().flatten()
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    squares = (x - x.mean()).square()
    variance = squares.mean()
    # squares * squares, not pow(4): the same numbers, several times faster on a CPU
    return (squares * squares).mean() / variance.square().clamp_min(torch.finfo(variance.dtype).tiny) - 3.0


def max_over_median(x: torch.Tensor) -> torch.Tensor:
    """max |x| / median |x| over every element: how far the largest activation stands out (the
    median as ``torch.median`` takes it: the lower middle value of an even count)."""
    magnitude = x.detach().float().abs().flatten()
    return magnitude.max() / magnitude.median().clamp_min(1e-30)


def sublayer_matrices(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    """Name -> (sub-layer number, weight) of every block's weight matrix."""
    matrices = {}
    for index, block in enumerate(model.blocks):
        for layer, part in ((2 * index + 1, block.attn), (2 * index + 2, block.mlp)):
            for name, module in part.named_modules():
                if isinstance(module, nn.Linear):
                    prefix = "attn" if part is block.attn else "mlp"
                    matrices[f"blocks.{index}.{prefix}.{name}.weight"] = (layer, module.weight)
    return matrices


@torch.no_grad()
def weight_kurtosis(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> excess kurtosis of every block's weight matrices, the embedding and an untied head."""
    named = {name: weight for name, (_, weight) in sublayer_matrices(model).items()}
    named["embed.weight"] = model.embed.weight
    if model.head.weight is not model.embed.weight:
        named["head.weight"] = model.head.weight
    # A sharded (FSDP2) parameter is gathered first: every rank takes part, in the same order.
    return {name: excess_kurtosis(w.full_tensor() if hasattr(w, "full_tensor") else w) for name, w in named.items()}


class InspectionProbe:
    """Collects the measures while ``Block.forward`` runs; ``eager`` asks the blocks to run their
    sub-layers uncompiled, because the hooks below would not fire inside a compiled graph."""

    eager = True

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.stats: dict[str, torch.Tensor] = {}

    def hooks(self, stack: ExitStack) -> None:
        for index, block in enumerate(self.model.blocks):
            stack.enter_context(block.attn.register_forward_hook(self._attention_hook(2 * index + 1)))
            stack.enter_context(block.mlp.register_forward_hook(self._mlp_hook(2 * index + 2)))

    def _attention_hook(self, layer: int):
        def hook(attention, inputs, output):  # inputs: (x, cos, sin[, packing, ...])
            x, cos, sin = inputs[:3]
            first = attention.first_token_attention(x, cos, sin)  # (B, heads, T)
            self.stats[f"inspect/sink_score/{layer_tag(layer)}"] = first[..., 1:].float().mean()
            self._measure_output(layer, output, x, inputs[3] if len(inputs) > 3 else None)

        return hook

    def _mlp_hook(self, layer: int):
        def hook(mlp, inputs, output):  # inputs: (x[, packing])
            self._measure_output(layer, output, inputs[0], inputs[1] if len(inputs) > 1 else None)

        return hook

    def _measure_output(self, layer: int, output: torch.Tensor, x: torch.Tensor, packing) -> None:
        rows = output.detach().flatten(0, -2)
        if packing is not None:
            # While skipping, the output is the executed tokens' packed rows, padded: only the real
            # ones describe what the sub-layer computes.
            rows = rows[packing.scatter < x.shape[0] * x.shape[1]]
        tag = layer_tag(layer)
        if rows.shape[0] == 0:  # NaN, not a missing tag: every rank must log the same tags
            self.stats[f"inspect/massive/output/{tag}"] = self.stats[f"inspect/kurtosis/output/{tag}"] = \
                torch.tensor(float("nan"), device=output.device)
            return
        self.stats[f"inspect/massive/output/{tag}"] = max_over_median(rows)
        self.stats[f"inspect/kurtosis/output/{tag}"] = excess_kurtosis(rows).float()

    def record(self, layer: int, before, after) -> None:
        residual = self.model.residual.full_residual(after)
        tag = layer_tag(layer)
        self.stats[f"inspect/massive/residual/{tag}"] = max_over_median(residual)
        self.stats[f"inspect/kurtosis/residual/{tag}"] = excess_kurtosis(residual).float()


@torch.no_grad()
def inspect_model(model: nn.Module, tokens: torch.Tensor, weights: bool = True) -> dict[str, torch.Tensor]:
    """The measures (module docstring) of ``model`` (a ``Transformer``) on ``tokens`` (B, T), in
    eval mode (no dropout); the model's training mode is restored. With ``weights=False`` the weight
    kurtosis (which depends on the weights only) is left out."""
    probe = InspectionProbe(model)
    was_training = model.training
    model.eval()
    try:
        with ExitStack() as stack:
            probe.hooks(stack)
            # The forward, not the blocks alone: FSDP2 gathers the root's weights (the embedding) in its hook.
            model(tokens, probe=probe)
    finally:
        model.train(was_training)
    # The strategy adds its own diagnostics (e.g. NAG's gates) to the probe's dict: not inspection measures.
    stats = {tag: value for tag, value in probe.stats.items() if tag.startswith("inspect/")}
    return {**stats, **weight_tags(model)} if weights else stats


def weight_tags(model: nn.Module, kurtosis: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``inspect/kurtosis/weight/layer_XX``: the largest excess kurtosis among each sub-layer's
    matrices (from ``kurtosis``, ``weight_kurtosis``'s result, when the caller has it already)."""
    kurtosis = weight_kurtosis(model) if kurtosis is None else kurtosis
    per_layer: dict[int, torch.Tensor] = {}
    for name, (layer, _) in sublayer_matrices(model).items():
        per_layer[layer] = torch.maximum(per_layer.get(layer, kurtosis[name]), kurtosis[name])
    return {f"inspect/kurtosis/weight/{layer_tag(layer)}": value.float() for layer, value in per_layer.items()}
