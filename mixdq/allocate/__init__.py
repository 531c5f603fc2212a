"""MixDQ bit allocation: per-group integer programs (exact, PuLP) and a millisecond greedy for previews."""

from mixdq.allocate.allocator import (
    AUTO,
    BAND,
    METHODS,
    PROTECTED_WEIGHTS,
    AllocationResult,
    Allocator,
    BelowUniform,
    BelowUniformWidthWarning,
    InfeasibleBudgetError,
    SideAllocation,
)
from mixdq.allocate.budget import WeightBudgetScale
from mixdq.allocate.groups import QUALITY_MIN_BITS, GroupSolution, candidate_bits, group_targets

__all__ = [
    "AUTO",
    "BAND",
    "METHODS",
    "PROTECTED_WEIGHTS",
    "QUALITY_MIN_BITS",
    "AllocationResult",
    "Allocator",
    "BelowUniform",
    "BelowUniformWidthWarning",
    "GroupSolution",
    "InfeasibleBudgetError",
    "SideAllocation",
    "WeightBudgetScale",
    "candidate_bits",
    "group_targets",
]
