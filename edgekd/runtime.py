"""Run an edgekd bundle in an app: only onnxruntime, numpy and Pillow (no torch, no timm).

    from edgekd.runtime import Predictor
    predictor = Predictor("runs/x/export")
    predictor.predict("shoe.jpg", top_k=3)   # [("Sneaker", 0.93), ("Sandal", 0.05), ...]

The preprocessing re-implements timm's eval transform (resize the shorter side to size / crop_pct, center crop,
scale to [0, 1], normalize, NCHW) from the bundle's preprocess.json; a test holds it to edgekd.data.eval_transform.
This file imports nothing from edgekd, so an app may also copy it on its own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import BinaryIO, Sequence, Union

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

PREPROCESS_NAME = "preprocess.json"
MODEL_NAME = "model.onnx"
_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX,
             "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS}

ImageLike = Union[str, Path, Image.Image, np.ndarray]  # an array: H x W (grey) or H x W x 3 / 4 (RGB / RGBA) uint8


class BundleError(ValueError):
    """The bundle or an image cannot be used; the message says why."""


class Predictor:
    """Top-k labels with probabilities from a bundle folder (model.onnx + preprocess.json)."""

    def __init__(self, bundle_dir: str | Path, *, threads: int = 0,
                 providers: Sequence[str] = ("CPUExecutionProvider",)):
        bundle = Path(bundle_dir)
        config_path = bundle / PREPROCESS_NAME
        if not config_path.is_file():
            raise BundleError(f"{bundle} is not an edgekd bundle: {PREPROCESS_NAME} is missing")
        self.config = json.loads(config_path.read_text(encoding="utf-8"))
        self.labels: list[str] = list(self.config["labels"])
        self.preprocess = ImagePreprocessor(self.config)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        model_path = bundle / self.config.get("model", MODEL_NAME)
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=list(providers))
        except Exception as error:  # noqa: BLE001 - ORT raises several types for a missing or broken model
            raise BundleError(f"cannot load {model_path} ({str(error).strip().splitlines()[0][:160]}); "
                              "it is not a model this onnxruntime can run: export the bundle again") from error
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        expected = list(self.config["input_size"])
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or len(outputs) != 1 or \
                any(isinstance(got, int) and got != want for got, want in zip(inputs[0].shape[1:], expected)):
            raise BundleError(f"{model_path} does not fit {config_path}: it takes "
                              f"{[(i.name, i.shape) for i in inputs]}, the bundle says N x {expected}")
        self.input_name = inputs[0].name

    def logits(self, images: Sequence[ImageLike]) -> np.ndarray:
        batch = np.stack([self.preprocess(image) for image in images])
        return self.session.run(None, {self.input_name: batch})[0]

    def predict(self, image: ImageLike, top_k: int = 5) -> list[tuple[str, float]]:
        """The `top_k` most likely labels with their softmax probabilities, most likely first."""
        return self.predict_batch([image], top_k)[0]

    def probabilities(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Softmax of the logits, N x classes (float64)."""
        logits = self.logits(images).astype(np.float64)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        return probs / probs.sum(axis=1, keepdims=True)

    def predict_batch(self, images: Sequence[ImageLike], top_k: int = 5) -> list[list[tuple[str, float]]]:
        if top_k < 1:
            raise BundleError(f"top_k is {top_k}; ask for at least 1 label")
        probs = self.probabilities(images)
        k = min(top_k, probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self._label(i), float(row[i])) for i in top] for row, top in zip(probs, order)]

    def _label(self, index: int) -> str:
        return self.labels[index] if index < len(self.labels) else str(index)


class ImagePreprocessor:
    """preprocess.json as a function: image -> float32 C x H x W, the pixels the model was validated on."""

    def __init__(self, config: dict):
        self.config = config
        channels, self.height, self.width = (int(v) for v in config["input_size"])
        self.mode = "L" if channels == 1 else "RGB"
        self.mean = np.asarray(config["mean"], dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(config["std"], dtype=np.float32).reshape(-1, 1, 1)
        if config.get("crop_mode", "center") not in ("center", "squash"):
            raise BundleError(f"crop_mode {config['crop_mode']!r} is not supported; use center or squash")
        if config.get("interpolation", "bilinear") not in _RESAMPLE:
            raise BundleError(f"interpolation {config['interpolation']!r} is not supported; use one of "
                              f"{', '.join(_RESAMPLE)}")

    def __call__(self, image: ImageLike) -> np.ndarray:
        pil = as_model_pixels(read_image(image), self.mode)
        crop_pct = float(self.config.get("crop_pct", 1.0))
        resample = _RESAMPLE[self.config.get("interpolation", "bilinear")]
        scale_h, scale_w = math.floor(self.height / crop_pct), math.floor(self.width / crop_pct)
        if self.config.get("crop_mode", "center") == "squash" or scale_h != scale_w:
            pil = pil.resize((scale_w, scale_h), resample)
        else:
            pil = pil.resize(_shorter_side_to(pil.size, scale_h), resample)
        pil = _center_crop(pil, self.height, self.width)
        array = np.asarray(pil, dtype=np.float32) / 255.0
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return ((array - self.mean) / self.std).astype(np.float32)


def read_image(image: ImageLike | BinaryIO, name: str | None = None) -> Image.Image:
    """A path's (or an open file's) image decoded whole: a truncated file is an error, not a grey-filled picture.
    An image is returned as given. `name` says which image in the error (default: the path)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):  # pixels an app already holds (a camera frame, a decoded upload)
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))) or \
                0 in image.shape:
            raise BundleError(f"cannot use a {image.dtype} array of shape {image.shape} as an image: give H x W "
                              "(grey) or H x W x 3 / 4 (RGB / RGBA) uint8 pixels")
        return Image.fromarray(image)
    if not isinstance(image, (str, Path)) and not hasattr(image, "read"):
        raise BundleError(f"cannot read an image from {type(image).__name__}: give a path, an open file, a PIL "
                          "image or a uint8 pixel array")
    try:
        with Image.open(image) as opened:
            opened.load()
            return opened.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise BundleError(f"cannot read image {name or image}: {error}") from error


def as_model_pixels(image: Image.Image, mode: str) -> Image.Image:
    """An image as users have it -> 8-bit `mode` ("RGB" or "L") pixels as they look on screen.

    Photo viewers and browsers show a phone photo turned by its EXIF orientation, a transparent PNG or GIF on a
    background, a 16-bit PNG scaled to 8 bits; Pillow's plain convert() does none of that (it clips 16-bit values,
    so a 16-bit grey PNG turns white, and drops alpha, so transparent areas take whatever colour they hide). The
    training data (edgekd.data) and every runtime go through this one function; the bundle's JavaScript apps do the
    same steps (predict.mjs, web/index.html).
    """
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit grey: scale to 8 bits, rounding
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        image = _on_white(image.convert("RGBA"))
    return image if image.mode == mode else image.convert(mode)


def _on_white(rgba: Image.Image) -> Image.Image:
    """Alpha-composite onto white in integer arithmetic the JavaScript apps repeat bit for bit:
    out = (colour * alpha + 255 * (255 - alpha) + 127) // 255."""
    pixels = np.asarray(rgba, dtype=np.uint32)
    colour, alpha = pixels[..., :3], pixels[..., 3:4]
    composited = (colour * alpha + 255 * (255 - alpha) + 127) // 255
    return Image.fromarray(composited.astype(np.uint8), "RGB")


def _shorter_side_to(size: tuple[int, int], side: int) -> tuple[int, int]:
    """torchvision Resize(int): the shorter side becomes `side`, the longer keeps the aspect (truncated)."""
    width, height = size
    if width <= height:
        return side, int(side * height / width)
    return int(side * width / height), side


def _center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """torchvision CenterCrop: zero-pad when the image is smaller, then take the rounded center."""
    if image.width < width or image.height < height:
        padded = Image.new(image.mode, (max(width, image.width), max(height, image.height)))
        padded.paste(image, ((padded.width - image.width) // 2, (padded.height - image.height) // 2))
        image = padded
    top = int(round((image.height - height) / 2.0))
    left = int(round((image.width - width) / 2.0))
    return image.crop((left, top, left + width, top + height))
