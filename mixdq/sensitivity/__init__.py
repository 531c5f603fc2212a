"""Per-layer sensitivity: the tidy table every sweep produces, and the published SDXL-Turbo data."""

from mixdq.sensitivity.published import (
    SDXL_TURBO_MODEL_ID,
    load_published_table,
    sdxl_turbo_inventory,
)
from mixdq.sensitivity.table import (
    COLUMNS,
    GROUP_METRIC,
    GroupMatrix,
    SensitivityTableError,
    group_matrix,
    group_sizes,
    read_table,
    select_protected,
    size_ratio,
    validate_table,
    write_table,
)

__all__ = [
    "COLUMNS",
    "GROUP_METRIC",
    "SDXL_TURBO_MODEL_ID",
    "GroupMatrix",
    "SensitivityTableError",
    "group_matrix",
    "group_sizes",
    "load_published_table",
    "read_table",
    "sdxl_turbo_inventory",
    "select_protected",
    "size_ratio",
    "validate_table",
    "write_table",
]
