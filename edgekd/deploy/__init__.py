"""From a trained student to a file an app embeds: ONNX export with parity checks, quantization under the accuracy
guard, verification, and the bundle (with the raw-image model and the app templates in apps/)."""
