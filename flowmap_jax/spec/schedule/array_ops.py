"""The array operations a schedule's formulas use, so each formula is written once for every backend.

A schedule class (`flowmap_jax.spec.schedule.base.ScheduleConfig`) computes alpha_t, sigma_t, their time
derivatives and the inverse of sigma / alpha against an `ArrayOps`; each backend passes its own:

- `NUMPY_OPS` (here): float64 numpy, for time grids and other host-side work;
- `flowmap_jax.core.schedules` (jax.numpy, float32) and `torch_ref.schedules` (torch, float32 on the times'
  device).

Each method is one elementary operation with numpy's meaning; the backends map it onto their own function
of the same meaning (numpy's `clip` is torch's `clamp`), so a formula gives what the backend's own code
would. A schedule whose formulas need another operation adds it here and in the two backends' ops.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ArrayOps", "NumpyOps", "NUMPY_OPS"]


class ArrayOps:
    """The operations, each with numpy's meaning. Arrays are the backend's own (numpy, jax or torch),
    in its working float dtype; `constant` brings a host (numpy) table to it."""

    def asarray(self, values):
        """Times (a number or an array of any shape) as a working-dtype array."""
        raise NotImplementedError

    def constant(self, table: np.ndarray, like):
        """A host float64 table as a working-dtype array where `like` lives (its device)."""
        raise NotImplementedError

    def to_index(self, x):
        """Whole-number floats -> an integer array that indexes a `constant` table."""
        raise NotImplementedError

    def full_like(self, x, value: float):
        raise NotImplementedError

    def where(self, condition, x, y):
        """`x` where `condition`, else `y`; `x` and `y` are arrays or numbers."""
        raise NotImplementedError

    def clip(self, x, lo, hi):
        raise NotImplementedError

    def maximum(self, x, value: float):
        """The elementwise maximum of an array and a number."""
        raise NotImplementedError

    def interp(self, x, xp, fp):
        """numpy.interp: xp increasing 1-D, values outside [xp[0], xp[-1]] clamp to the ends."""
        raise NotImplementedError

    def isinf(self, x):
        raise NotImplementedError

    def floor(self, x):
        raise NotImplementedError

    def exp(self, x):
        raise NotImplementedError

    def expm1(self, x):
        raise NotImplementedError

    def log(self, x):
        raise NotImplementedError

    def log1p(self, x):
        raise NotImplementedError

    def sqrt(self, x):
        raise NotImplementedError

    def sin(self, x):
        raise NotImplementedError

    def cos(self, x):
        raise NotImplementedError

    def tan(self, x):
        raise NotImplementedError

    def arctan(self, x):
        raise NotImplementedError

    def arccos(self, x):
        raise NotImplementedError


class NumpyOps(ArrayOps):
    """float64 numpy."""

    def asarray(self, values):
        return np.asarray(values, np.float64)

    def constant(self, table, like):
        return np.asarray(table, np.float64)

    def to_index(self, x):
        return x.astype(np.int64)

    def full_like(self, x, value):
        return np.full_like(x, value)

    def where(self, condition, x, y):
        return np.where(condition, x, y)

    def clip(self, x, lo, hi):
        return np.clip(x, lo, hi)

    def maximum(self, x, value):
        return np.maximum(x, value)

    def interp(self, x, xp, fp):
        return np.interp(x, xp, fp)

    def isinf(self, x):
        return np.isinf(x)

    def floor(self, x):
        return np.floor(x)

    def exp(self, x):
        return np.exp(x)

    def expm1(self, x):
        return np.expm1(x)

    def log(self, x):
        return np.log(x)

    def log1p(self, x):
        return np.log1p(x)

    def sqrt(self, x):
        return np.sqrt(x)

    def sin(self, x):
        return np.sin(x)

    def cos(self, x):
        return np.cos(x)

    def tan(self, x):
        return np.tan(x)

    def arctan(self, x):
        return np.arctan(x)

    def arccos(self, x):
        return np.arccos(x)


NUMPY_OPS = NumpyOps()
