"""Residual strategies: one file each, behind the ``ResidualStrategy`` interface (``base.py``)."""

from nag_lightning.model.residual.base import ResidualStrategy, SkipPlan
from nag_lightning.model.residual.deepnorm import DeepNorm
from nag_lightning.model.residual.layernorm_scaling import LayerNormScaling
from nag_lightning.model.residual.layerscale import LayerScale
from nag_lightning.model.residual.nag import NAG, NAGState
from nag_lightning.model.residual.nag_ablations import NAGFixedBeta, NAGNoCentring, NAGNoGate, NAGNoOrthogonalisation
from nag_lightning.model.residual.ngpt import NGPT
from nag_lightning.model.residual.orthogonal import OrthogonalUpdate
from nag_lightning.model.residual.postnorm import PostNorm
from nag_lightning.model.residual.prenorm import PreNorm
from nag_lightning.model.residual.rezero import ReZero
from nag_lightning.model.residual.router_mod import RouterMoD

# The one registry of strategies by name: the names of their overlays in configs/residual/ and of
# `nag study --strategies`.
BY_NAME: dict[str, type[ResidualStrategy]] = {
    "prenorm": PreNorm, "postnorm": PostNorm, "layernorm_scaling": LayerNormScaling, "orthogonal": OrthogonalUpdate,
    "nag": NAG, "deepnorm": DeepNorm, "rezero": ReZero, "layerscale": LayerScale, "nag_no_gate": NAGNoGate,
    "nag_fixed_beta": NAGFixedBeta, "nag_no_centring": NAGNoCentring, "nag_no_orthogonalisation": NAGNoOrthogonalisation,
    "ngpt": NGPT, "router_mod": RouterMoD,
}

__all__ = ["BY_NAME", "NAG", "NGPT", "DeepNorm", "LayerNormScaling", "LayerScale", "NAGFixedBeta", "NAGNoCentring", "NAGNoGate",
           "NAGNoOrthogonalisation", "NAGState", "OrthogonalUpdate", "PostNorm", "PreNorm", "ResidualStrategy", "ReZero",
           "RouterMoD", "SkipPlan"]
