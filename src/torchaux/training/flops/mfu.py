"""Model FLOPs utilisation: achieved model FLOP/s over the hardware's peak.

Why a helper: the definition (PaLM, Chowdhery et al. 2022, appendix B) is
simple but easy to get subtly wrong -- counting recomputation (that is HFU,
hardware FLOPs utilisation), forgetting the number of devices, or timing a
step without synchronising the device.  This function only does the
arithmetic and validates it; it never guesses a peak (a CPU has no meaningful
datasheet number, and accelerators differ by dtype and sparsity).
"""

from __future__ import annotations

import math

__all__ = ["mfu"]


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"mfu: {name} must be a finite number {bound}, got {value!r}")


def mfu(
    flops_per_step: float,
    step_time_s: float,
    peak_flops_per_s: float,
    *,
    n_devices: int = 1,
) -> float:
    """Fraction of peak throughput used: ``flops_per_step / step_time_s / (peak * n_devices)``.

    Pass model FLOPs (``FlopsCounter().get_flops()[0]``) for MFU, or total FLOPs
    (index 1, recomputation included) for HFU.  ``flops_per_step`` must cover
    all ``n_devices`` (sum the per-rank counts, or multiply one rank's count by
    the data-parallel degree when ranks do identical work).

    Args:
        flops_per_step: FLOPs of one optimizer step, forward and backward.
        step_time_s: wall time of one step in seconds, measured after a device
            synchronisation and averaged over steps past warm-up.
        peak_flops_per_s: peak FLOP/s of **one** device for the dtype used,
            e.g. 989e12 for dense bf16 on an H100 SXM (NVIDIA datasheet).
        n_devices: devices that shared the step.

    Returns:
        A fraction; 0.4 means 40 % of peak.

    Raises:
        ValueError: a negative or non-finite count, a non-positive time or peak,
            or ``n_devices`` < 1.

    Example:
        >>> mfu(3.0e12, 0.5, 1.0e13)
        0.6
        >>> round(mfu(6.0e12, 0.5, 1.0e13, n_devices=2), 3)
        0.6
    """
    _check_positive("flops_per_step", flops_per_step, allow_zero=True)
    _check_positive("step_time_s", step_time_s)
    _check_positive("peak_flops_per_s", peak_flops_per_s)
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise ValueError(f"mfu: n_devices must be an int >= 1, got {n_devices!r}")
    return flops_per_step / step_time_s / (peak_flops_per_s * n_devices)
