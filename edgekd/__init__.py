"""edgekd: distil a big timm image model into a small ONNX model that fits a latency budget on a device."""

__version__ = "0.1.0"
