"""Everything that changes how a built model runs but not what it computes, applied in one place
and one order (as torchtitan's ``parallelize``): activation checkpointing, then regional
compilation, then FSDP2 sharding. Pure PyTorch; checkpoints' keys are the same either way."""

from __future__ import annotations

from typing import Any

from nag_lightning.model.transformer import Transformer


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def parallelize(model: Transformer, *, activation_checkpointing: bool = False, compile: bool = False,
                compile_mode: str = "default", data_parallel_mesh: Any = None) -> Transformer:
    """Apply, in this order:

    1. ``activation_checkpointing``: each block's activations are recomputed in the backward pass
       (``torch.utils.checkpoint`` around every block) instead of kept;
    2. ``compile``: regional ``torch.compile`` of every sub-layer (``Block.compile_sublayers``):
       the sub-layer number is an argument, so all blocks share their graphs and compile time
       stays that of one block; with threshold skipping, the token packing between sub-layers runs
       eagerly. In capacity mode, each whole block is one graph (``Block.compile_block``);
    3. ``data_parallel_mesh``: FSDP2, ``fully_shard`` on every block, then on the whole model.

    A model is parallelized once; a second call is an error rather than a silent double wrap.
    """
    if getattr(model, "parallelized", False):
        raise RuntimeError("parallelize: this model has already been parallelized.")
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}.")
    model.activation_checkpointing = activation_checkpointing
    if compile:
        import torch._dynamo

        # Each sub-layer graph is specialised by design on a few things: attention or MLP, dense or
        # skipping (and the attention layout), training or evaluation, diagnostics or not. That is
        # bounded (a test counts it) but exceeds Dynamo's default of 8 compiled versions per
        # function, past which it silently runs the function eagerly; the more so with several
        # models in one process (``nag bench``).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        whole_blocks = model.skip_policy is not None and model.skip_policy.config.mode == "capacity"
        for block in model.blocks:
            # Capacity mode has static shapes and never reads the device: each block is one graph
            # (decision and packing included). Threshold mode packs on the host between sub-layers.
            mode = None if compile_mode == "default" else compile_mode
            block.compile_block(mode=mode) if whole_blocks else block.compile_sublayers(mode=mode)
    if data_parallel_mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block, mesh=data_parallel_mesh)
        fully_shard(model, mesh=data_parallel_mesh)
    model.parallelized = True
    return model
