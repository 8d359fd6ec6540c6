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
import operator

__all__ = ["mfu"]


def _real(name: str, value: object, *, allow_zero: bool = False) -> float:
    """``value`` as a finite float, > 0 (or >= 0); Python, numpy and 0-d tensor numbers alike."""
    if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
        raise TypeError(
            f"mfu: {name} must be a real number, got {type(value).__name__} ({value!r}); "
            "pass one number per step, e.g. FlopsCounter().get_flops()[0]"
        )
    try:
        number = float(value)  # type: ignore[arg-type]
    except (OverflowError, TypeError, ValueError) as exc:
        raise ValueError(f"mfu: {name} must be a finite number, got {value!r}") from exc
    ok = number >= 0 if allow_zero else number > 0
    if not (math.isfinite(number) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"mfu: {name} must be a finite number {bound}, got {value!r}")
    return number


def _count(name: str, value: object) -> int:
    """``value`` as an int >= 1: Python and numpy integers, never bools or floats."""
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        number = None
    if isinstance(value, bool) or number is None or number < 1:
        raise ValueError(
            f"mfu: {name} must be an int >= 1, got {type(value).__name__} {value!r}; "
            "pass the number of devices that shared the step"
        )
    return number


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
        TypeError: a count, time or peak that is not a real number (a list).
        ValueError: a negative or non-finite count, a non-positive time or peak,
            or ``n_devices`` not an integer >= 1 (numpy integers are accepted).

    Example:
        >>> mfu(3.0e12, 0.5, 1.0e13)
        0.6
        >>> round(mfu(6.0e12, 0.5, 1.0e13, n_devices=2), 3)
        0.6
    """
    flops = _real("flops_per_step", flops_per_step, allow_zero=True)
    seconds = _real("step_time_s", step_time_s)
    peak = _real("peak_flops_per_s", peak_flops_per_s)
    return flops / seconds / (peak * _count("n_devices", n_devices))
