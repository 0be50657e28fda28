"""Model components; importing this package registers them in ``dfine.config.registry.MODELS``."""

from dfine.models.decoder import DFINETransformer
from dfine.models.dfine import DFINE
from dfine.models.hgnetv2 import HGNetv2
from dfine.models.hybrid_encoder import HybridEncoder
from dfine.models.postprocessor import DFINEPostProcessor

__all__ = ["DFINE", "DFINEPostProcessor", "DFINETransformer", "HGNetv2", "HybridEncoder"]
