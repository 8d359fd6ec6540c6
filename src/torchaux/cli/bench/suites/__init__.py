"""The benchmark suites beside the training-loop one, each behind a ``torchaux bench`` flag.

* :mod:`~torchaux.cli.bench.suites.manager` — ``--manager``: CheckpointManager and S3;
* :mod:`~torchaux.cli.bench.suites.frameworks` — ``--frameworks``: Lightning and the HF Trainer;
* :mod:`~torchaux.cli.bench.suites.load` — ``--load``: load throughput and peak RSS, page cache cold and warm;
* :mod:`~torchaux.cli.bench.suites.distributed` — ``--distributed``: sharded saves on real ranks against DCP
  (gloo on CPU; ``--device cuda``: NCCL, one rank per GPU);
* :mod:`~torchaux.cli.bench.suites.cuda` — ``--cuda``: D2H staging against the pinned memcpy, loads onto the GPU.

Each module's ``main(args)`` runs the suite from the parsed ``torchaux bench`` arguments and
returns the exit status.
"""
