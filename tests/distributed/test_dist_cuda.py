"""torchaux.distributed on CUDA: FSDP2 over NCCL, commit over gloo (needs a GPU; CI has none).

Run with the device tool (docs/benchmarks.md, "GPU"): one rank per GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.multiprocess,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_nccl_available(),
                       reason="needs torch.distributed with NCCL"),
]


def test_fsdp_on_cuda_saves_and_loads_with_torchaux_and_stock_dcp(tmp_path: Path) -> None:
    """Eager and model= save_async, and dcp.async_save with torchaux's Stager, of CUDA DTensors.

    Each file equals the state at its call although a training step follows
    at once, loads back onto the GPU with torchaux and with stock dcp.load.
    """
    import cuda_workers

    cuda_workers.run("save_and_load", min(2, torch.cuda.device_count()), str(tmp_path))
