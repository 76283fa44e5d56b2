"""A Llama-style decoder in plain PyTorch (no Lightning), readable top to bottom.

token embedding -> n_layers x [causal attention (RoPE, GQA) ; SwiGLU MLP] -> LM head.

Every block has two sub-layers, numbered ``l = 1..2*n_layers`` over the whole model (attention of
block ``b`` is ``2b - 1``, its MLP ``2b``). How the residual stream is represented, read by a
sub-layer, written back, entered from the embedding and turned into logits belongs to the
config's residual strategy (``residual/``): pre-norm is ``x + f(norm(x))``, NAG rotates a
direction lane and grows a log-norm lane.
"""

from __future__ import annotations

import copy
import math
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nag_lightning.model.config import ModelConfig
from nag_lightning.model.flops import forward_flops, useful_forward_flops
from nag_lightning.model.generation import sample_tokens
from nag_lightning.model.kv_cache import KVCache
from nag_lightning.model.packing import EVERY_TOKEN, NO_TOKEN, TokenPacking, run_counts
from nag_lightning.model.residual import ResidualStrategy
from nag_lightning.model.residual.base import SkipPlan, layer_tag
from nag_lightning.model.skip_policy import (SkipPolicy, SkipRecord, SkipStats, SubLayerRecord, dense_stats,
                                             skip_capability_error)

if TYPE_CHECKING:
    from nag_lightning.model.inspection import InspectionProbe


class ForwardOutput(NamedTuple):
    """``Transformer.forward`` with ``return_record`` or ``return_stats``."""

    logits: torch.Tensor
    record: SkipRecord  # what ran, per sub-layer
    stats: dict[str, torch.Tensor] | None = None  # residual diagnostics (return_stats)


def rope_tables(head_dim: int, context_length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (context_length, head_dim // 2) for rotary position embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(context_length, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :h/2], x[..., h/2:]) of ``x`` (B, heads, T, h) by position-dependent angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.n_heads * config.head_dim, bias=False)
        # Keys and values in one matmul; kept apart from queries so a later skip can drop queries only.
        self.kv_proj = nn.Linear(config.d_model, 2 * config.n_kv_heads * config.head_dim, bias=False)
        self.out_proj = nn.Linear(config.n_heads * config.head_dim, config.d_model, bias=False)
        self.dropout = config.dropout
        # nGPT (``ResidualStrategy.normalised_sublayers``): queries and keys unit-norm per head, then
        # scaled per head and feature by a learned s_qk (stored as 1/sqrt(d) times its value, the
        # paper's parametrisation; with fewer key heads than query heads the keys get their own),
        # and a softmax scale of sqrt(h) instead of 1/sqrt(h).
        self.query_scale = self.key_scale = self.softmax_scale = None
        if config.residual.normalised_sublayers:
            stored = 1.0 / math.sqrt(config.d_model)
            self.query_scale = nn.Parameter(torch.full((config.n_heads, 1, config.head_dim), stored))
            if config.n_kv_heads != config.n_heads:
                self.key_scale = nn.Parameter(torch.full((config.n_kv_heads, 1, config.head_dim), stored))
            self.scale_factor, self.softmax_scale = math.sqrt(config.d_model), math.sqrt(config.head_dim)

    def scaled(self, x: torch.Tensor, keys: bool = False) -> torch.Tensor:
        """Rotary-embedded queries (or ``keys``), (B, heads, T, h), as attention compares them:
        unchanged, or (nGPT) normalised per head and scaled by s_qk."""
        if self.query_scale is None:
            return x
        scale = self.key_scale if keys and self.key_scale is not None else self.query_scale
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12) * (scale * self.scale_factor).to(x.dtype)

    def keys_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotary-embedded) and values of every token of ``x`` (B, T, d): (B, kv_heads, T, h) each."""
        batch, seq, _ = x.shape
        k, v = self.kv_proj(x).view(batch, seq, 2, self.n_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.scaled(apply_rope(k, cos, sin), keys=True), v

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Queries (rotary-embedded) of every token of ``x`` (B, T, d): (B, heads, T, h)."""
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        return self.scaled(apply_rope(q, cos, sin))

    def first_token_attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The attention weight each query gives the first token (B, heads, T): the attention-sink
        measure (``inspection.py``). Computed as causal attention over values that are 1 at the
        first key and 0 elsewhere, so the fused kernel never holds the T x T weights."""
        k, v = self.keys_values(x, cos, sin)
        marker = torch.zeros_like(v)
        marker[:, :, 0, 0] = 1.0
        attended = F.scaled_dot_product_attention(self.queries(x, cos, sin), k, marker, is_causal=True,
                                                  enable_gqa=self.n_kv_heads != self.n_heads, scale=self.softmax_scale)
        return attended[..., 0]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, packing: TokenPacking | None = None,
                cache: KVCache | None = None, block: int = 0) -> torch.Tensor:
        """Attention output (B, T, d). With ``packing`` (``packing.py``), only its tokens ask queries,
        and the output is their packed rows (Np, d); every token still writes its keys and values,
        so the KV budget stays fixed. With ``cache`` (``kv_cache.py``), the keys and values
        join block ``block``'s cache and the queries also see the ones held there; ``cos``/``sin``
        are then the tables at the new tokens' positions (``KVCache.begin``)."""
        batch, seq, _ = x.shape
        k, v = self.keys_values(x, cos, sin)
        causal = {"is_causal": True}
        if cache is not None:
            k, v, causal = cache.store(block, k, v)
        dropout = self.dropout if self.training else 0.0
        gqa = self.n_kv_heads != self.n_heads
        if packing is None:
            q = self.queries(x, cos, sin)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, enable_gqa=gqa, scale=self.softmax_scale,
                                               **causal)
            return self.out_proj(y.transpose(1, 2).reshape(batch, seq, -1))
        # Query and output projections on the executed tokens, packed across the batch; the
        # attention itself on their (B, W) query layout.
        q = self.q_proj(packing.gather_rows(x)).view(-1, self.n_heads, self.head_dim)
        q = apply_rope(q, packing.rows_of(cos).unsqueeze(1), packing.rows_of(sin).unsqueeze(1))
        width = seq if packing.query_positions is None else packing.query_positions.shape[1]
        q = q.new_zeros(batch * width + 1, *q.shape[1:]).index_copy(0, packing.slot, q)[:-1]
        q = self.scaled(q.view(batch, width, self.n_heads, self.head_dim).transpose(1, 2))  # padding rows stay 0
        if packing.query_positions is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, enable_gqa=gqa, scale=self.softmax_scale,
                                               **causal)
        else:
            keys = packing.key_range.shape[0]
            causal = packing.query_positions[:, None, :, None] >= packing.key_range  # (B, 1, W, K)
            y = F.scaled_dot_product_attention(q, k[:, :, :keys], v[:, :, :keys], attn_mask=causal,
                                               dropout_p=dropout, enable_gqa=gqa, scale=self.softmax_scale)
        y = y.transpose(1, 2).reshape(batch * width, -1).index_select(0, packing.slot.clamp_max(batch * width - 1))
        return self.out_proj(y)


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.d_model, 2 * config.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        # nGPT (``ResidualStrategy.normalised_sublayers``): learned scales of the two inputs, s_v on
        # the gate and s_u on the other, both starting at 1. The paper also multiplies the gate by
        # sqrt(d) because its stream has norm 1; NGPT's stream has norm sqrt(d) (RMS 1), so its
        # unit-norm rows already give SiLU inputs of order 1.
        self.gate_scale = self.up_scale = None
        if config.residual.normalised_sublayers:
            self.gate_scale = nn.Parameter(torch.ones(config.mlp_hidden))
            self.up_scale = nn.Parameter(torch.ones(config.mlp_hidden))

    def forward(self, x: torch.Tensor, packing: TokenPacking | None = None) -> torch.Tensor:
        """The MLP's output (B, T, d); with ``packing`` (``packing.py``), computed for its tokens
        only: their packed rows (Np, d)."""
        rows = x if packing is None else packing.gather_rows(x)
        gate, up = self.gate_up_proj(rows).chunk(2, dim=-1)
        if self.gate_scale is not None:
            gate = gate * self.gate_scale.to(gate.dtype)
            up = up * self.up_scale.to(up.dtype)
        return self.dropout(self.down_proj(F.silu(gate) * up))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(config)
        self.mlp = SwiGLU(config)
        self.compiled_body = None  # set by compile_block (capacity mode): the whole block in one graph

    def forward(self, state, residual: ResidualStrategy, policy: SkipPolicy | None, first_layer: int,
                cos: torch.Tensor, sin: torch.Tensor, probe: "ResidualProbe | InspectionProbe | None" = None,
                cache: KVCache | None = None, calibrate: float | None = None):
        """The stream state after this block's two sub-layers, and what each did (two ``SubLayerRecord``)."""
        # Capacity mode's capacities (top-k mode's k) are arguments (Python ints), not read inside
        # the block: the compiled graph then serves every block (they turn dynamic once they differ).
        seq = cos.shape[-2]
        capacities = (policy.capacity(first_layer, seq), policy.capacity(first_layer + 1, seq)) \
            if policy is not None and policy.config.mode in ("capacity", "topk") else None
        if self.compiled_body is not None and probe is None and cache is None and calibrate is None:
            return self.compiled_body(state, residual, policy, first_layer, cos, sin, capacities=capacities)
        return self.body(state, residual, policy, first_layer, cos, sin, probe, cache, calibrate, capacities)

    def body(self, state, residual: ResidualStrategy, policy: SkipPolicy | None, first_layer: int,
             cos: torch.Tensor, sin: torch.Tensor, probe=None, cache: KVCache | None = None,
             calibrate: float | None = None, capacities: tuple[int, int] | None = None):
        # Decoding with a cache runs eagerly: its shapes and positions change with every token. So
        # does an inspection, whose hooks on the sub-layers would not fire inside a compiled graph.
        eager = cache is not None or getattr(probe, "eager", False)
        sublayer = partial(Block.sublayer, self) if eager else self.sublayer
        skipping = policy is not None and (policy.active or calibrate is not None)
        records = []
        for index, (layer, is_attention) in enumerate(((first_layer, True), (first_layer + 1, False))):
            plan = packing = decision = None
            if skipping:
                # Known before the sub-layer runs: which tokens execute it. Threshold mode reads their
                # count on the host to pack them, so this stays outside the compiled sub-layer.
                plan = residual.plan(state, layer)
                decision = policy.decide(plan.gate, plan.step, layer, is_attention, calibrate,
                                         decoding=cache is not None,
                                         keys_from_zero=cache is None or cache.starts_at_zero,
                                         capacity=None if capacities is None else capacities[index],
                                         predictor_logit=plan.predictor_logit)
                plan, packing = plan._replace(executed=decision.executed), decision.packing
            if packing is NO_TOKEN:  # no token executes this sub-layer: it costs nothing
                new_state = self.skipped(state, residual, layer, is_attention, cos, sin, cache)
            else:  # EVERY_TOKEN: unpacked, since gathering and scattering would only cost time
                packing = None if packing is EVERY_TOKEN else packing
                new_state, plan = sublayer(state, residual, layer, is_attention, cos, sin, plan, packing, cache)
            records.append(self.record(policy, layer, plan, decision, packing, is_attention))
            if probe is not None:
                probe.stats.update(residual.plan_stats(layer, plan))
                probe.record(layer, state, new_state)
            state = new_state
        return state, tuple(records)

    @staticmethod
    def record(policy: SkipPolicy | None, layer: int, plan: SkipPlan, decision,
               packing: TokenPacking | str | None = None, is_attention: bool = False) -> SubLayerRecord:
        """What sub-layer ``layer`` did; ``packing``: the one it ran with (None: unpacked; ``NO_TOKEN``: left out)."""
        if policy is None:
            return SubLayerRecord()
        step = plan.step.detach()
        if decision is None:  # a dense forward: the controls' random scores would only move the RNG
            random = policy.config.rule in ("random", "last_layers")
            return SubLayerRecord(None if random else policy.score(plan.gate, step, layer), step)
        executed = decision.executed
        # torch.full, not torch.tensor: a fill on the device, where a blocking copy from the host synchronises.
        ran = (torch.full((), count, dtype=torch.float64, device=executed.device)
               for count in run_counts(*executed.shape, packing, is_attention))
        return SubLayerRecord(decision.score, step, executed, decision.over_capacity, *ran, decision.predictor_loss,
                              decision.predicted)

    def sublayer(self, state, residual: ResidualStrategy, layer: int, is_attention: bool, cos: torch.Tensor,
                 sin: torch.Tensor, plan: SkipPlan | None, packing: TokenPacking | None,
                 cache: KVCache | None = None):
        """One sub-layer from the stream state to the next, and its plan: the unit ``compile_sublayers`` compiles.
        Without skipping the plan (NAG's gate) is made here, so the compiler fuses it with the
        stream update. The sub-layer number is an argument, not an attribute, so one compiled
        graph serves every block (NAG with Triton kernels adds one: the first sub-layer's state
        carries no look-ahead, ``NAG.write_ahead``)."""
        if plan is None:
            plan = residual.plan(state, layer)
        x = residual.read(state, layer)
        if is_attention:
            update = self.attn(x, cos, sin, packing, cache, (layer - 1) // 2)
        else:
            update = self.mlp(x, packing)
        if packing is None:
            return residual.write_ahead(state, update, layer, plan), _detached(plan)
        written = residual.write_packed_ahead(state, update, layer, plan, packing)  # the scatter fused in, where it can be
        if written is not None:
            return written, _detached(plan)
        # Only the executed tokens' lanes change, so the update runs on their packed rows alone
        # (the skipped tokens' element-wise work is saved too), which then go back in place.
        rows = map_lanes(packing.gather_rows, state)
        gate, step = (None if lane is None else packing.gather_rows(lane) for lane in (plan.gate, plan.step))
        new_rows = residual.write(rows, update, layer, SkipPlan(gate=gate, step=step))
        return map_lanes(packing.scatter_into, state, new_rows), _detached(plan)

    def skipped(self, state, residual: ResidualStrategy, layer: int, is_attention: bool, cos: torch.Tensor,
                sin: torch.Tensor, cache: KVCache | None):
        """The state after a sub-layer that no token executes: unchanged. Attention's keys and
        values still join the cache."""
        if is_attention and cache is not None:
            cache.store((layer - 1) // 2, *self.attn.keys_values(residual.read(state, layer), cos, sin))
        return map_lanes(lambda lane: lane, state)  # the lanes; a look-ahead made for this sub-layer is dropped

    def compile_sublayers(self, **options) -> None:
        """Regional compilation: ``sublayer`` compiled; the packing between sub-layers stays eager,
        so the compiled graphs have no breaks and their shapes only change by buckets."""
        self.sublayer = torch.compile(self.sublayer, **options)

    def compile_block(self, **options) -> None:
        """The whole block (gate, decision, packing, both sub-layers) as one graph without breaks
        (``fullgraph``): capacity mode, whose shapes are static and which never reads the device.
        Calls with a probe, a cache or a calibration run ``body`` eagerly."""
        self.compiled_body = torch.compile(self.body, fullgraph=True, **options)


def map_lanes(function, state, *others):
    """``function`` over each lane of a stream state: a tensor, or a strategy's named tuple of lanes
    (``NAGState``), with the matching lanes of ``others``. A field that is not a tensor (NAG's
    look-ahead for the next sub-layer) comes out None: it described the rows as they were."""
    if isinstance(state, torch.Tensor):
        return function(state, *others)
    return type(state)(*(function(*lanes) if isinstance(lanes[0], torch.Tensor) else None
                         for lanes in zip(state, *others)))


def _detached(plan: SkipPlan) -> SkipPlan:
    """The plan as the sub-layer hands it out: only records and diagnostics read it, so a compiled
    sub-layer's graph gets no outputs that need gradients besides the stream state."""
    return SkipPlan(*(None if value is None else value.detach() for value in plan))


class ResidualProbe:
    """Per-sub-layer statistics of the full residual R, gathered only when asked for (no grad)."""

    def __init__(self, residual: ResidualStrategy) -> None:
        self.residual = residual
        self.stats: dict[str, torch.Tensor] = {}
        self.first_rms: torch.Tensor | None = None
        self.last_rms: torch.Tensor | None = None

    @torch.no_grad()
    def record(self, layer: int, before, after) -> None:
        r_in, r_out = self.residual.full_residual(before), self.residual.full_residual(after)
        norm_in, norm_out = r_in.norm(dim=-1), r_out.norm(dim=-1)
        d = r_in.shape[-1]
        if self.first_rms is None:
            self.first_rms = norm_in / math.sqrt(d)
        self.last_rms = norm_out / math.sqrt(d)
        cosine = ((r_in * r_out).sum(-1) / (norm_in * norm_out).clamp_min(1e-30)).clamp(-1.0, 1.0)
        tag = layer_tag(layer)
        self.stats[f"residual/rms/{tag}"] = (norm_in / math.sqrt(d)).mean()
        self.stats[f"residual/relative_update/{tag}"] = ((r_out - r_in).norm(dim=-1) / norm_in.clamp_min(1e-30)).mean()
        self.stats[f"residual/rotation_deg/{tag}"] = torch.rad2deg(torch.arccos(cosine)).mean()

    def summary(self) -> dict[str, torch.Tensor]:
        growth = (self.last_rms / self.first_rms.clamp_min(1e-30)).mean()
        return {**self.stats, "residual/norm_growth": growth, **self.residual.parameter_stats()}


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        # A copy, so that two models built from one config never share strategy parameters.
        self.residual = copy.deepcopy(config.residual)
        self.residual.bind(config.d_model, 2 * config.n_layers, config.norm_eps, config.kernels)
        self.residual.bind_head(config.vocab_size)
        # Which tokens run each sub-layer: only a gated strategy (NAG) can skip.
        self.skip_policy = SkipPolicy(config.skip, 2 * config.n_layers) if self.residual.gated else None
        self.register_load_state_dict_pre_hook(Transformer._upgrade_skip_state)
        self.register_load_state_dict_pre_hook(Transformer._refuse_ngpt_without_normalised_sublayers)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rope_tables(config.head_dim, config.context_length, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()
        # Set by parallelize() (with compilation and sharding): recompute each block in the backward.
        self.activation_checkpointing = False

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        self.residual.reset_embedding(self.embed.weight)
        # Depth-scaled init of the projections that write into the residual stream.
        for block in self.blocks:
            for proj in (block.attn.out_proj, block.mlp.down_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layers))
            self.residual.reset_sublayer(block.attn, block.mlp)
        if self.residual.normalised_weights:
            self.normalise_weights()

    @torch.no_grad()
    def normalise_weights(self) -> None:
        """Every matrix unit-norm along the model dimension (nGPT): the rows of the embedding, the
        head and the projections that read the stream; the columns of those that write to it."""
        writers = {id(block.attn.out_proj) for block in self.blocks} | {id(block.mlp.down_proj) for block in self.blocks}
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                weight = module.weight
                along = 0 if id(module) in writers else 1
                weight.div_(weight.norm(dim=along, keepdim=True).clamp_min(self.config.norm_eps))

    def forward(self, tokens: torch.Tensor, return_stats: bool = False, probe: InspectionProbe | None = None,
                return_record: bool = False, calibrate: float | None = None):
        """Logits (B, T, vocab) for token ids (B, T).

        With ``return_record`` or ``return_stats``, a ``ForwardOutput``: the logits, what the
        forward did per sub-layer (``SkipRecord``: skip scores, executed tokens) and, with
        ``return_stats``, the residual diagnostics (TensorBoard tag -> scalar tensor). ``probe``
        (``inspection.py``) is told about every sub-layer (through ``forward``, so a sharded model
        gathers its weights). ``calibrate``: a gated model skips that rate of each sub-layer's
        scores; ``SkipPolicy.calibrate_from`` then sets the thresholds from the record."""
        seq = tokens.shape[1]
        if seq > self.config.context_length:
            raise ValueError(
                f"Sequence length {seq} exceeds ModelConfig.context_length={self.config.context_length}."
            )
        if calibrate is not None and self.skip_policy is None:
            raise skip_capability_error(self.residual, "calibrating skip thresholds")
        if return_stats:
            probe = ResidualProbe(self.residual)
        state, record = self.stream(tokens, self.rope_cos[:seq], self.rope_sin[:seq], probe, calibrate=calibrate)
        logits = self.residual.logits(state, self.head)
        if not (return_stats or return_record):
            return logits
        return ForwardOutput(logits, record, {**probe.summary(), **record.router_stats()} if return_stats else None)

    def stream(self, tokens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               probe: ResidualProbe | InspectionProbe | None = None,
               cache: KVCache | None = None, calibrate: float | None = None):
        """The residual stream's final state for ``tokens`` (B, T) at the rotary tables ``cos``/``sin``,
        and the ``SkipRecord`` of what ran."""
        state = self.residual.enter(self.drop(self.embed(tokens)))
        layers = {}
        for index, block in enumerate(self.blocks):
            args = (state, self.residual, self.skip_policy, 2 * index + 1, cos, sin, probe, cache, calibrate)
            if self.activation_checkpointing and torch.is_grad_enabled():
                state, records = checkpoint(block, *args, use_reentrant=False)
            else:
                state, records = block(*args)
            layers.update({2 * index + 1 + i: record for i, record in enumerate(records)})
        return state, SkipRecord(layers, tokens.shape[0], tokens.shape[1])

    def extend(self, tokens: torch.Tensor, cache: KVCache, lengths: list[int] | None = None,
               return_record: bool = False):
        """Run ``tokens`` (B, T) after the tokens ``cache`` holds, adding their keys and values to
        it; return the logits (B, vocab) after each sequence's last new token (and, with
        ``return_record``, the forward's ``SkipRecord``). With ``lengths``,
        sequence ``b`` has only ``lengths[b]`` new tokens and the rest of its row is padding, which
        the cache forgets (prompts of different lengths in one batch)."""
        batch, seq = tokens.shape
        lengths = [seq] * batch if lengths is None else list(lengths)
        if len(lengths) != batch or not all(1 <= n <= seq for n in lengths):
            raise ValueError(f"lengths must hold {batch} values in [1, {seq}], got {lengths}.")
        cos, sin = cache.begin(seq, self.rope_cos, self.rope_sin)
        state, record = self.stream(tokens, cos, sin, cache=cache)
        cache.commit(lengths)
        rows = torch.arange(batch, device=tokens.device)
        last = torch.tensor(lengths, device=tokens.device) - 1
        final = map_lanes(lambda lane: lane[rows, last].unsqueeze(1), state)  # every lane: (B, 1, ...)
        logits = self.residual.logits(final, self.head)[:, 0]
        return (logits, record) if return_record else logits

    def forward_flops(self, batch: int, seq: int, stats: SkipStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(executed, dense) forward FLOPs of a (batch, seq) forward that executed ``stats``
        (``SkipRecord.stats()``; None: every token ran every sub-layer). Executed: what ran,
        padding rows and the attention layout's scores included; see flops.py."""
        gates = self.residual.gate_directions
        dense = forward_flops(self.config, dense_stats(2 * self.config.n_layers, batch, seq), gates)
        executed = dense if stats is None else forward_flops(self.config, stats, gates)
        return executed, dense

    def useful_forward_flops(self, batch: int, seq: int, stats: SkipStats | None = None) -> torch.Tensor:
        """The forward FLOPs the executed tokens of ``stats`` needed (no padding rows, attention of
        executed queries over their causal prefix): at most the executed ones; see flops.py."""
        stats = dense_stats(2 * self.config.n_layers, batch, seq) if stats is None else stats
        return useful_forward_flops(self.config, stats, self.residual.gate_directions)

    def _upgrade_skip_state(self, state_dict, prefix, *args) -> None:
        """Checkpoints before the skip policy kept the thresholds in the residual strategy
        (``residual.thresholds``, earlier ``residual.skip_threshold``) and had no capacities."""
        for old in ("residual.thresholds", "residual.skip_threshold"):
            if prefix + old in state_dict:
                state_dict.setdefault(prefix + "skip_policy.thresholds", state_dict.pop(prefix + old))
        if prefix + "skip_policy.thresholds" in state_dict:
            state_dict.setdefault(prefix + "skip_policy.capacity_shares", torch.zeros(2 * self.config.n_layers))

    def _refuse_ngpt_without_normalised_sublayers(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                                  unexpected_keys, error_msgs) -> None:
        """nGPT checkpoints from before its normalised sub-layers have no s_qk, s_u, s_v and compute
        another function: one sentence saying so, before the list of missing keys (``strict`` is
        always True here: ``load_state_dict`` filters missing keys after the hooks)."""
        if self.residual.normalised_sublayers and prefix + "blocks.0.attn.q_proj.weight" in state_dict \
                and prefix + "blocks.0.attn.query_scale" not in state_dict:
            error_msgs.append("this nGPT checkpoint predates nGPT's normalised attention and MLP scales (s_qk, s_u, "
                              "s_v; nag-lightning 2026-12-05) and computes another function without them: train it "
                              "again, or load it with the package from before that change.")

    def require_skipping(self, what: str) -> SkipPolicy:
        """The skip policy; a clear error naming ``what`` (a command or callback) when the strategy cannot skip."""
        if self.skip_policy is None:
            raise skip_capability_error(self.residual, what)
        return self.skip_policy

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``prompt`` (B, T) followed by up to ``max_new_tokens`` sampled tokens (greedy when
        ``temperature == 0``), decoded with a KV cache; fewer when the context fills up first."""
        new = list(sample_tokens(self, prompt.tolist(), max_new_tokens, temperature, top_k, generator))
        return torch.cat([prompt, *(token.unsqueeze(1) for token in new)], dim=1)
