"""A trained ``Transformer`` as a Hugging Face ``transformers`` model (``modeling_nag.py``).

``save_hf_folder`` writes a folder that loads with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` where this package is
not installed: ``config.json`` (the ``ModelConfig`` as ``nag_config``, and an ``auto_map`` naming
the classes in ``modeling_nag.py``), the weights as ``model.safetensors`` (the package's state
dict under the prefix ``model.``) and a copy of ``modeling_nag.py`` itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from nag_lightning.interop import modeling_nag
from nag_lightning.interop.modeling_nag import NagLightningConfig, NagLightningForCausalLM
from nag_lightning.model import ModelConfig, Transformer

AUTO_MAP = {"AutoConfig": "modeling_nag.NagLightningConfig",
            "AutoModelForCausalLM": "modeling_nag.NagLightningForCausalLM"}


def hf_config(model_config: ModelConfig, skip_enabled: bool = False) -> NagLightningConfig:
    """The Hugging Face config of a model built from ``model_config``; ``skip_enabled``: a gated
    model skips with its trained thresholds."""
    return NagLightningConfig(nag_config=model_config.to_dict(), skip_enabled=skip_enabled)


def to_hf(transformer: Transformer, skip_enabled: bool = False) -> NagLightningForCausalLM:
    """``transformer``'s weights in the Hugging Face model: float32, on the CPU, in eval mode."""
    model = NagLightningForCausalLM(hf_config(transformer.config, skip_enabled))
    model.model.load_state_dict(transformer.state_dict(), strict=True)  # copies, casting to float32
    return model.float().eval()


def save_hf_folder(transformer: Transformer, out_dir: str | Path, skip_enabled: bool = False) -> Path:
    """Write ``transformer`` as a folder that ``from_pretrained(out_dir, trust_remote_code=True)``
    loads without this package (module docstring); return the folder."""
    out = Path(out_dir)
    model = to_hf(transformer, skip_enabled)
    model.config.auto_map = dict(AUTO_MAP)
    model.save_pretrained(out)
    shutil.copyfile(modeling_nag.__file__, out / "modeling_nag.py")
    return out
