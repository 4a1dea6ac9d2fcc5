"""Numbers the teacher's ODE solvers of both backends share (`samplers.py` in each). Pure Python.

Times are in teacher units; rho = sigma / alpha is the noise-to-signal ratio (infinite where alpha = 0).
"""

from __future__ import annotations

__all__ = ["CLEAN_START_EVALUATIONS", "HEUN_EDM_MAX_RHO", "SPACING_RHO_MAX", "SPACING_RHO_MIN"]

CLEAN_START_EVALUATIONS = 2
"""Teacher evaluations of `teacher_solve`'s step from a source below `t_eval_min` (DDPM's [-1, 0)) up to
t_eval_min: fixed-point iterations of its implicit trapezoid rule from the zero-slope predictor (1 is Heun's
predictor-corrector). Measured on the mixture data (SD's schedule, 8 x 64 elements, t = -1 to 999,
DPM-Solver++(2M), log-SNR grid): error at t = 0 of 2.8e-4 with 1 (6% of the step's increment), 1.0e-4 with
2 (2%, the converged rule's own error); at t = 999 after 64 steps 1.8e-3 and 1.2e-3, floors (256 steps)
1.1e-3 and 4.3e-4."""

HEUN_EDM_MAX_RHO = 20.0
"""Heun uses diffusers' HeunDiscrete form where sigma / alpha at the step's start is at most this."""

SPACING_RHO_MIN, SPACING_RHO_MAX = 5e-3, 20.0
"""The noise-to-signal ratios rho = sigma / alpha at which the "karras" and "logsnr" spacings of
`solve_grid` saturate: the spacing variable is g(rho) = rho_min + rho / (1 + rho / rho_max), finite at both
ends of every schedule (rho = 0 clean, rho = inf where alpha = 0). Chosen by measurement (the target error
of benchmarks/teacher_target_error.py, 128 pairs, with these constants changed): rho_max = 20 rather than
EDM's sigma_max = 80 spends fewer steps where the ODE is nearly straight (24 log-SNR steps on VP cosine:
0.57% error with (5e-3, 20), 1.1% with (2e-3, 80); rho_max = 5 or 10 gave 0.3-1.3%)."""
