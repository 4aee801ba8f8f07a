"""mobilequant: quantize lightweight CNNs and export them to TFLite / ONNX, verified in the real runtimes.

The package is layered one way: ``models`` → ``capture`` / ``fusion`` → ``quant`` → ``export`` →
``runtime`` → ``audit``; the CLI (``mobilequant.cli``) only calls the public API.
"""

__version__ = "0.1.0"
