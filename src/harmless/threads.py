"""Thread counts for work whose matrices are small or whose bits must not depend on the machine.

* :func:`one_torch_thread`: torch on one thread for the block, the count restored after. The bits
  of a solve depend on the thread count, so one thread per process is what makes every engine of
  a job (one process, Ray workers) write the same bytes; the experiments' matrices are small, so
  one thread is about as fast and leaves the other cores to the machine.
* :func:`one_blas_thread`: NumPy/SciPy's BLAS (OpenBLAS) on one thread for the block, through
  threadpoolctl. On a busy machine extra OpenBLAS threads made a 256 x 243 SVD take 0.2 s instead
  of 5 ms (the sweep certificate of an 8x8/s4 stem at 224 px: 12 s instead of 0.08 s).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["one_blas_thread", "one_torch_thread"]


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block on one torch thread, then restore the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_blas_thread() -> contextlib.AbstractContextManager[object]:
    """Run the block with one BLAS thread (threadpoolctl), then restore the limits."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")
