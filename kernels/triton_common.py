"""Triton helpers shared by the ops' kernels. Imported only by Triton modules (never by `kernels` itself), so
importing `kernels` on a machine without Triton still works."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def softplus(x):
    # same threshold as torch.nn.functional.softplus: linear above 20
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


def rows_per_program(d_state: int, rows: int, max_tile: int, max_rows: int) -> int:
    """Rows of a (rows x d_state) fp32 state tile given to one decode-step program: a power of two keeping the
    tile near `max_tile` values (enough work per program, no register spills at d_state 128-256), at most
    `max_rows`."""
    return max(1, min(triton.next_power_of_2(rows), max_tile // triton.next_power_of_2(d_state), max_rows))
