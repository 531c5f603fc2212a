"""Structure the code base promises: one source of truth for shared constants."""

from __future__ import annotations

import kernels.pack
import kernels.reference
from mixdq.config import ACT_BITS, WEIGHT_BITS


def test_kernel_bit_lists_match_the_config() -> None:
    # The kernels keep their own copy (importing mixdq from kernels would cycle through mixdq.deploy).
    assert sorted(kernels.pack.WEIGHT_BITS) == sorted(WEIGHT_BITS) == [2, 4, 8]
    assert kernels.reference.ACT_BITS == ACT_BITS == (4, 8)
