"""What the NumPy backend implements, declared before anything heavy is imported.

kbit loads this module at discovery (``kbit info``, first quantization call). It must stay
cheap: no NumPy import, no device probing. Declare exactly what the backend implements:
kbit never calls it for anything else, and the conformance suite checks both directions
(every declared variant matches the reference, every other one is refused).
"""

from kbit.backend import API_VERSION, BackendManifest, OpSupport

# NumPy has no bfloat16, so this backend does not claim it: bfloat16 calls go to the next
# backend (the reference), and `kbit conformance numpy` checks that they are refused here.
DTYPES = ("float16", "float32")
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
# 4-bit: the input dtype (quantize) or output dtype (dequantize) is one NumPy has; the
# packed bytes may be viewed as any storage dtype, bfloat16 included (they are only bytes).
QUANT4 = OpSupport(
    dtypes=DTYPES,
    blocksizes=(32, 64, 128, 256, 512, 1024, 2048, 4096),
    quant_types=("nf4", "fp4"),
    quant_storages=("uint8", "float16", "bfloat16", "float32"),
)

MANIFEST = BackendManifest(
    name="numpy",
    api_version=API_VERSION,
    # Above the reference (0): on CPU, what this backend declares it serves by default.
    priority=10,
    device_types=("cpu",),
    factory="kbit_numpy.backend:NumpyBackend",
    ops={
        "quantize_blockwise": OpSupport(dtypes=DTYPES, blocksizes=BLOCKSIZES),
        "dequantize_blockwise": OpSupport(dtypes=DTYPES, blocksizes=BLOCKSIZES),
        "quantize": OpSupport(dtypes=DTYPES),
        "dequantize": OpSupport(dtypes=DTYPES),
        "quantize_no_absmax": OpSupport(dtypes=DTYPES),
        "dequantize_no_absmax": OpSupport(dtypes=DTYPES),
        "histogram_scatter_add_2d": OpSupport(dtypes=("float32",)),
        # estimate_quantiles is not implemented: kbit routes it elsewhere.
        "quantize_4bit": QUANT4,
        "dequantize_4bit": QUANT4,
        # gemv_4bit and matmul_4bit are not implemented either.
    },
    description="NumPy implementation of the 8-bit blockwise family and 4-bit quantization (vendor template)",
)
