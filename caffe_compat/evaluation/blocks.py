"""The evaluation's quadratic work (distances of every query to every point, of every
point to every center) runs on blocks of rows so that no n x n matrix is ever held:
the block size."""
from __future__ import annotations

# Size of one block of distances; 256 MiB keeps SOP (60,502 x 11,316) well under 4 GB.
BLOCK_BYTES = 256 << 20


def rows_per_block(columns: int, bytes_per_value: int = 4) -> int:
    """How many rows of `columns` values fit in one block of BLOCK_BYTES."""
    return max(1, BLOCK_BYTES // (bytes_per_value * max(columns, 1)))
