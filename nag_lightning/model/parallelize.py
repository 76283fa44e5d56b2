"""Everything that changes how a built model runs but not what it computes, applied in one place
and one order (as torchtitan's ``parallelize``): activation checkpointing, then regional
compilation, then FSDP2 sharding. Pure PyTorch; checkpoints' keys are the same either way."""

from __future__ import annotations

from typing import Any

from nag_lightning.model.transformer import Transformer


def parallelize(model: Transformer, *, activation_checkpointing: bool = False, compile: bool = False,
                data_parallel_mesh: Any = None) -> Transformer:
    """Apply, in this order:

    1. ``activation_checkpointing``: each block's activations are recomputed in the backward pass
       (``torch.utils.checkpoint`` around every block) instead of kept;
    2. ``compile``: regional ``torch.compile`` of every sub-layer (``Block.compile_sublayers``):
       the sub-layer number is an argument, so all blocks share their graphs and compile time
       stays that of one block; with skipping, the token packing between sub-layers runs eagerly;
    3. ``data_parallel_mesh``: FSDP2, ``fully_shard`` on every block, then on the whole model.

    A model is parallelized once; a second call is an error rather than a silent double wrap.
    """
    if getattr(model, "parallelized", False):
        raise RuntimeError("parallelize: this model has already been parallelized.")
    model.activation_checkpointing = activation_checkpointing
    if compile:
        import torch._dynamo

        # Each sub-layer graph is specialised by design on a few things: attention or MLP, dense or
        # skipping (and the attention layout), training or evaluation, diagnostics or not. That is
        # bounded (a test counts it) but exceeds Dynamo's default of 8 compiled versions per
        # function, past which it silently runs the function eagerly; the more so with several
        # models in one process (``nag bench``).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for block in model.blocks:
            block.compile_sublayers()
    if data_parallel_mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block, mesh=data_parallel_mesh)
        fully_shard(model, mesh=data_parallel_mesh)
    model.parallelized = True
    return model
