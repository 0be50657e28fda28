"""Model components; importing this package registers them in ``dfine.registry.MODELS``."""

from .decoder import DFINETransformer
from .dfine import DFINE
from .hgnetv2 import HGNetv2
from .hybrid_encoder import HybridEncoder
from .postprocessor import DFINEPostProcessor

__all__ = ["DFINE", "DFINEPostProcessor", "DFINETransformer", "HGNetv2", "HybridEncoder"]
