"""Synchronous data-parallel averaging of dense gradients.

``AllreduceConfig`` (Monolith's environment switches, read by ``from_env``),
``allreduce_cond`` over torch.distributed or Horovod, fp16/bf16 compression and
the aligned flat buffers behind fusion. May import ``monolith_torch.core``.
"""

from monolith_torch.distributed.allreduce import AllreduceConfig, allreduce_cond

__all__ = ["AllreduceConfig", "allreduce_cond"]
