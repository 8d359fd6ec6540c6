"""Mirror of ``torch_npu.utils``: port Ascend code by changing the import.

This package only re-exports; the implementations live in their own modules.
"""

from torchaux.checkpoint.api import save_async

__all__ = ["save_async"]
