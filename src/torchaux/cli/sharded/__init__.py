"""``torchaux inspect DIR`` / ``torchaux verify DIR``: distributed (DCP) checkpoint directories.

* :mod:`~torchaux.cli.sharded.index` - the directory as its ``.metadata`` describes it;
* :mod:`~torchaux.cli.sharded.report` - the inspect report (ranks, files, shard layout);
* :mod:`~torchaux.cli.sharded.check` - the verify checks (complete, every byte intact).

No process group or GPU is needed.
"""

from torchaux.cli.sharded.check import summary_line, verify_dir
from torchaux.cli.sharded.index import is_distributed_dir, read_index
from torchaux.cli.sharded.report import format_dir_report, inspect_dir

__all__ = [
    "inspect_dir", "format_dir_report", "verify_dir", "summary_line", "read_index",
    "is_distributed_dir",
]
