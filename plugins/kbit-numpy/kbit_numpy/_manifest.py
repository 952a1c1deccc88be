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
    },
    description="NumPy implementation of the 8-bit blockwise family (vendor template)",
)
