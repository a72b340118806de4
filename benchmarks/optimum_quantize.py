"""Quantize an fp32 ONNX classifier the way a Hugging Face Optimum user would, for the side-by-side in
quantization_host.py: `ORTQuantizer` with `AutoQuantizationConfig.avx512_vnni` (static: MinMax calibration on the
same images edgekd calibrates on; dynamic: no calibration).

Optimum pins huggingface_hub < 1.0, which edgekd's timm does not accept, so it lives in its own environment
(`make optimum-env` makes .venv-optimum):

    .venv-optimum/bin/python benchmarks/optimum_quantize.py fp32.onnx calibration.npy out_dir

Writes out_dir/optimum_static.onnx and out_dir/optimum_dynamic.onnx, and prints the versions used as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from importlib.metadata import version
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("fp32", type=Path)
    parser.add_argument("calibration", type=Path, help=".npy of preprocessed images, N x C x H x W float32")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # Optimum logs every calibrated tensor

    import datasets
    import onnxruntime
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoCalibrationConfig, AutoQuantizationConfig

    args.out_dir.mkdir(parents=True, exist_ok=True)
    images = np.load(args.calibration).astype(np.float32)
    calibration = datasets.Dataset.from_dict({"input": list(images)}).with_format("numpy")
    for mode in ("static", "dynamic"):
        quantizer = ORTQuantizer.from_pretrained(args.fp32.parent, file_name=args.fp32.name)
        config = AutoQuantizationConfig.avx512_vnni(is_static=mode == "static", per_channel=True)
        ranges = None
        if mode == "static":
            ranges = quantizer.fit(dataset=calibration, calibration_config=AutoCalibrationConfig.minmax(calibration),
                                   onnx_augmented_model_name=args.out_dir / "augmented.onnx", batch_size=16)
        folder = quantizer.quantize(quantization_config=config, save_dir=args.out_dir / mode,
                                    calibration_tensors_range=ranges)
        (written,) = Path(folder).glob("*.onnx")
        shutil.move(written, args.out_dir / f"optimum_{mode}.onnx")
        shutil.rmtree(folder)
    (args.out_dir / "augmented.onnx").unlink(missing_ok=True)
    print(json.dumps({"optimum": version("optimum"), "onnxruntime": onnxruntime.__version__}))


if __name__ == "__main__":
    main()
