"""torch.nn modules with quantized weights, mirroring ``bitsandbytes.nn``.

Each module family lives in its own private submodule and is re-exported here.
"""

__all__: list[str] = []

from ._linear8bit import Embedding8bit, Int8Params, Linear8bitLt  # noqa: E402

__all__ += ["Embedding8bit", "Int8Params", "Linear8bitLt"]
from ._embedding import Embedding, StableEmbedding  # noqa: E402

__all__ += ["Embedding", "StableEmbedding"]
