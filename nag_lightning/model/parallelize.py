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
    2. ``compile``: regional ``torch.compile``, each block compiled with ``nn.Module.compile()``;
       the sub-layer number is an argument, so all blocks share one graph and compile time stays
       that of one block;
    3. ``data_parallel_mesh``: FSDP2, ``fully_shard`` on every block, then on the whole model.

    A model is parallelized once; a second call is an error rather than a silent double wrap.
    """
    if getattr(model, "parallelized", False):
        raise RuntimeError("parallelize: this model has already been parallelized.")
    model.activation_checkpointing = activation_checkpointing
    if compile:
        for block in model.blocks:
            block.compile()
    if data_parallel_mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block, mesh=data_parallel_mesh)
        fully_shard(model, mesh=data_parallel_mesh)
    model.parallelized = True
    return model
