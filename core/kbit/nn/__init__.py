"""torch.nn modules with quantized weights, mirroring ``bitsandbytes.nn``.

Each module family lives in its own private submodule and is re-exported here.
"""

from ._embedding import Embedding, StableEmbedding
from ._embedding4bit import Embedding4bit, EmbeddingFP4, EmbeddingNF4
from ._linear4bit import Linear4bit, LinearFP4, LinearNF4
from ._linear8bit import Embedding8bit, Int8Params, Linear8bitLt
from ._params4bit import Params4bit

__all__ = [
    "Embedding",
    "Embedding4bit",
    "Embedding8bit",
    "EmbeddingFP4",
    "EmbeddingNF4",
    "Int8Params",
    "Linear4bit",
    "Linear8bitLt",
    "LinearFP4",
    "LinearNF4",
    "Params4bit",
    "StableEmbedding",
]

# The bitsandbytes import path ``nn.modules`` (after __all__: it re-exports these names).
from . import modules  # noqa: E402
