"""torch.nn modules with quantized weights, mirroring ``bitsandbytes.nn``.

Each module family lives in its own private submodule and is re-exported here.
"""

__all__: list[str] = []

from ._embedding import Embedding, StableEmbedding  # noqa: E402

__all__ += ["Embedding", "StableEmbedding"]
