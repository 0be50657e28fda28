"""Training losses: the Hungarian matcher, the D-FINE criterion (VFL, L1, GIoU, FGL, DDF) and DEIM's (MAL)."""

from dfine.losses.criterion import DEIMCriterion, DFINECriterion
from dfine.losses.matcher import HungarianMatcher
from dfine.losses.pairs import Matching, Pairs

__all__ = ["DEIMCriterion", "DFINECriterion", "HungarianMatcher", "Matching", "Pairs"]
