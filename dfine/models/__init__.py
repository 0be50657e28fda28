"""Model components; importing this package registers them in ``dfine.registry.MODELS``."""

from .dfine import DFINE

__all__ = ["DFINE"]
