"""Training losses: the Hungarian matcher and the D-FINE criterion (VFL, L1, GIoU, FGL, DDF)."""

from .criterion import DFINECriterion
from .matcher import HungarianMatcher
from .pairs import Matching, Pairs

__all__ = ["DFINECriterion", "HungarianMatcher", "Matching", "Pairs"]
