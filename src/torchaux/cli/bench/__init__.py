"""``torchaux bench``: the benchmark harness.

* :mod:`~torchaux.cli.bench.run` — the training loop, paired baselines, one method per child process;
* :mod:`~torchaux.cli.bench.methods` / :mod:`~torchaux.cli.bench.secure` — the methods compared;
* :mod:`~torchaux.cli.bench.child` — the child process entry point;
* :mod:`~torchaux.cli.bench.measure` — fingerprints and the RSS sampler;
* :mod:`~torchaux.cli.bench.report` — tables, JSON and the plot;
* :mod:`~torchaux.cli.bench.engine` — ``python -m torchaux.cli.bench.engine``: writer CPU per GiB, first save;
* :mod:`~torchaux.cli.bench.suites` — ``--manager``, ``--frameworks``, ``--load``, ``--distributed``;
* :mod:`~torchaux.cli.bench.disk_io` — ``python -m torchaux.cli.bench.disk_io``: page cache against direct I/O.
"""

from torchaux.cli.bench.run import BenchConfig, run_bench

__all__ = ["BenchConfig", "run_bench"]
