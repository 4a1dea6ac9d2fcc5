"""Numbers the teacher's ODE solvers of both backends share (`samplers.py` in each). Pure Python.

Times are in teacher units; rho = sigma / alpha is the noise-to-signal ratio (infinite where alpha = 0).
"""

from __future__ import annotations

__all__ = ["HEUN_EDM_MAX_RHO", "SPACING_RHO_MAX", "SPACING_RHO_MIN"]

HEUN_EDM_MAX_RHO = 20.0
"""Heun uses diffusers' HeunDiscrete form where sigma / alpha at the step's start is at most this."""

SPACING_RHO_MIN, SPACING_RHO_MAX = 5e-3, 20.0
"""The noise-to-signal ratios rho = sigma / alpha at which the "karras" and "logsnr" spacings of
`solve_grid` saturate: the spacing variable is g(rho) = rho_min + rho / (1 + rho / rho_max), finite at both
ends of every schedule (rho = 0 clean, rho = inf where alpha = 0). Chosen by measurement (the target error
of benchmarks/teacher_target_error.py, 128 pairs, with these constants changed): rho_max = 20 rather than
EDM's sigma_max = 80 spends fewer steps where the ODE is nearly straight (24 log-SNR steps on VP cosine:
0.57% error with (5e-3, 20), 1.1% with (2e-3, 80); rho_max = 5 or 10 gave 0.3-1.3%)."""
