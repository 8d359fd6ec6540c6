"""``torchaux bench --frameworks``: Lightning and the HF Trainer, their checkpointing against torchaux's.

:mod:`.measure` runs and reports (its docstring says what is measured and how),
:mod:`.clock` times a run's steps and pairs its windows, :mod:`.lightning_run`
and :mod:`.hf_run` build each framework's runs.
"""

from torchaux.cli.bench.suites.frameworks.measure import (
    FrameworkResult,
    format_frameworks,
    run_frameworks,
)

__all__ = ["FrameworkResult", "run_frameworks", "format_frameworks"]
