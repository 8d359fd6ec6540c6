"""Checkpoint manager: periodic saves, retention, resume, preemption, local or S3.

* :mod:`~torchaux.manager.manager` - :class:`CheckpointManager`, the public entry point;
* :mod:`~torchaux.manager.policy` - which steps to save and which to keep;
* :mod:`~torchaux.manager.steps` - step names, the commit marker's content;
* :mod:`~torchaux.manager.local_store`, :mod:`~torchaux.manager.remote_store` - steps on a
  local disk (directory rename) and on S3 (commit marker written last);
* :mod:`~torchaux.manager.sharded` - distributed steps: every rank saves its shards, rank 0
  publishes, keeps ``latest`` and runs retention;
* :mod:`~torchaux.manager.group` - how the ranks agree (one all-reduce per ``save()``,
  broadcasts from rank 0, rank 0's verdicts through the store);
* :mod:`~torchaux.manager.background` - the manager's thread and failures not yet seen;
* :mod:`~torchaux.manager.preemption` - the opt-in SIGTERM/SIGUSR1 notice;
* :mod:`~torchaux.manager.restore` - loading a step of either layout, into a live state.
"""

from torchaux.manager.manager import CheckpointManager

__all__ = ["CheckpointManager"]
