"""torch.nn modules with quantized weights, mirroring ``bitsandbytes.nn``.

Each module family lives in its own private submodule and is re-exported here.
"""

from ._embedding import Embedding, StableEmbedding

__all__: list[str] = []
__all__ += ["Embedding", "StableEmbedding"]
