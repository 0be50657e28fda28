"""Training losses: the Hungarian matcher and the D-FINE criterion (VFL, L1, GIoU, FGL, DDF)."""

from dfine.losses.criterion import DFINECriterion
from dfine.losses.matcher import HungarianMatcher
from dfine.losses.pairs import Matching, Pairs

__all__ = ["DFINECriterion", "HungarianMatcher", "Matching", "Pairs"]
