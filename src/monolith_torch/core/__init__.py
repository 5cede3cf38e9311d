"""The bottom layer: ragged id tensors, 64-bit hashing, tensor-list helpers.

Imports only torch, numpy, pyarrow (the string-id hash reads Arrow buffers)
and the standard library; every other package of monolith_torch may import it.
"""

from monolith_torch.core.ragged import RaggedTensor

__all__ = ["RaggedTensor"]
