"""Learned rounding of int8 convolution weights (AdaRound: Nagel et al., "Up or Down? Adaptive Rounding for
Post-Training Quantization", ICML 2020).

Rounding each weight to its nearest int8 step is not what keeps a layer's outputs closest to fp32's: the errors of
a filter's weights add up over its inputs, and on the real EfficientNet-Lite0 weight rounding alone changed a tenth
of the top-1 answers on photographs (bias correction, which fixes only each channel's mean, took that to 5%). AdaRound
chooses, per weight, to round down or up, by fitting the layer's outputs on real inputs: a soft rounding variable per
weight, pushed to 0 or 1 by an annealed regulariser, trained with Adam to make conv(x_int8, w) match the fp32
layer's output. The scales stay what onnxruntime's quantizer chose; only the int8 values change, by at most one
step, so the file keeps its form and kernels.

onnxruntime's quantizer has no such pass (AIMET and Intel Neural Compressor have it, for their own graph formats):
it is written here in torch over the QDQ graph's depthwise Conv layers (MAX_FILTER_INPUTS), one at a time, each
fitted on the inputs the already-rounded layers before it produce (the "asymmetric" reconstruction of the paper), to
the fp32 graph's output.
The hyper-parameters are those of the reference implementations (BRECQ, AIMET: lambda 0.01, beta 20 -> 2 after a
20% warm-up, zeta 1.1, gamma -0.1), with fewer, larger steps to fit a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F

# Only depthwise convs (one input channel a filter: 9 or 25 weights) are re-rounded. A filter of few weights cannot
# average its rounding errors away: on the real Lite0 its depthwise layers' rounding alone cost 8 points of agreement
# on photos. Their steps also cost about a millisecond, where a 1x1 conv over 1152 channels costs 50 ms; and
# re-rounding every conv of Lite0 (minutes) agreed with fp32 no more often than re-rounding the depthwise ones and the
# stem: 94.7% of every photo crop (a probe). The stem (27 weights a filter, reading the image itself) is left alone
# although it gave most of that (depthwise only: 92.8%): with it re-rounded, a tiny ResNet's int8 answered a raw
# uint8 image (one pixel level off Pillow's resize here and there) unlike its Python runtime on more than 1% of
# images (tests/test_raw_input.py); why is not known yet.
MAX_FILTER_INPUTS = 32
# Output positions (image x pixel) per image the layer's statistics are taken over; a fifth of the images are held
# out to check the fit.
POSITIONS_PER_IMAGE = 512
HELD_OUT = 0.2
STEPS = 500
LEARNING_RATE = 1e-2
REGULARISATION = 0.01
BETA_START, BETA_END, WARM_UP = 20.0, 2.0, 0.2
ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch: h reaches exactly 0 and 1


@dataclass(frozen=True)
class ConvGeometry:
    """How a 2-D ONNX Conv walks its input."""

    group: int
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # ONNX order: top, left, bottom, right
    dilations: tuple[int, int]

    @classmethod
    def of(cls, node: onnx.NodeProto, kernel_dims: int) -> ConvGeometry | None:
        """None for what this pass does not handle: other than 2-D kernels, or auto_pad (the exporter writes pads)."""
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        auto_pad = attributes.get("auto_pad", b"NOTSET")
        if kernel_dims != 2 or (auto_pad not in (b"NOTSET", "NOTSET")):
            return None
        return cls(group=int(attributes.get("group", 1)), strides=tuple(attributes.get("strides", (1, 1))),
                   pads=tuple(attributes.get("pads", (0, 0, 0, 0))),
                   dilations=tuple(attributes.get("dilations", (1, 1))))


def worth_learning(weight_shape: tuple[int, ...]) -> bool:
    """Whether a conv weight (out x in/group x kh x kw) is re-rounded: a depthwise one (see MAX_FILTER_INPUTS)."""
    return weight_shape[1] == 1 and int(np.prod(weight_shape[1:])) <= MAX_FILTER_INPUTS


@dataclass(frozen=True)
class RoundingFit:
    """One layer's outcome: the share of weights rounded the other way from nearest, and the held-out output error
    (mean squared, relative to the fp32 outputs' variance) with nearest and with learned rounding."""

    flipped: float
    error_nearest: float
    error_learned: float

    @property
    def kept(self) -> bool:
        return self.error_learned < self.error_nearest


@dataclass(frozen=True)
class LayerMoments:
    """What a linear layer's output error depends on, over a set of output positions: the error of weights w (groups
    x outputs per group x patch) is  w.H.w - 2 w.C + E  per position, summed over output channels. Fitting on these
    moments instead of on the positions themselves makes a step cost outputs x patch^2, not positions x outputs x
    patch: on Lite0's 1152-channel depthwise layers 0.2 s became about a millisecond."""

    hessian: torch.Tensor  # groups x patch x patch: E[x x^T] of each group's input patches
    cross: torch.Tensor  # groups x outputs per group x patch: E[x (y - bias)] for each output channel
    energy: torch.Tensor  # outputs: E[(y - bias)^2] per channel
    variance: float  # of the fp32 outputs, to put the error on a scale

    def error(self, weights: torch.Tensor) -> torch.Tensor:
        """Mean over positions of the squared output error, summed over channels."""
        quadratic = (torch.matmul(weights, self.hessian) * weights).sum()
        return quadratic - 2 * (weights * self.cross).sum() + self.energy.sum()

    def relative_error(self, weights: torch.Tensor) -> float:
        with torch.no_grad():
            return float(self.error(weights)) / (len(self.energy) * self.variance)


def layer_moments(inputs: np.ndarray, outputs: np.ndarray, bias: np.ndarray | None, geometry: ConvGeometry,
                  kernel: tuple[int, ...], *, positions: int = POSITIONS_PER_IMAGE,
                  seed: int = 0) -> tuple[LayerMoments, LayerMoments]:
    """The moments of a conv over `inputs` (its input, N x C x H x W) and `outputs` (the fp32 layer's output there),
    on up to `positions` random output positions per image: (on the first 80% of the images, on the rest). Patches
    are taken image by image: a depthwise layer's unfolded input is 9x the size of its input."""
    rng = np.random.default_rng(seed)
    held = max(1, int(len(inputs) * HELD_OUT)) if len(inputs) > 1 else 0
    shift = None if bias is None else torch.from_numpy(bias.astype(np.float32))
    top, left, bottom, right = geometry.pads
    sums: list[list[torch.Tensor]] = [[], []]
    for i in range(len(inputs)):
        x = F.pad(torch.from_numpy(np.ascontiguousarray(inputs[i:i + 1], dtype=np.float32)), (left, right, top, bottom))
        unfolded = F.unfold(x, kernel, dilation=geometry.dilations, stride=geometry.strides)[0]  # patch x L
        y = torch.from_numpy(np.ascontiguousarray(outputs[i], dtype=np.float32)).reshape(outputs.shape[1], -1)
        if unfolded.shape[1] != y.shape[1]:
            raise ValueError(f"conv geometry gives {unfolded.shape[1]} positions, its output has {y.shape[1]}")
        if y.shape[1] > positions:
            chosen = torch.from_numpy(rng.choice(y.shape[1], size=positions, replace=False))
            unfolded, y = unfolded[:, chosen], y[:, chosen]
        if shift is not None:
            y = y - shift[:, None]
        x = unfolded.reshape(geometry.group, -1, unfolded.shape[1])  # groups x patch x positions
        y = y.reshape(geometry.group, -1, y.shape[1])  # groups x outputs per group x positions
        part = sums[1 if i >= len(inputs) - held else 0]
        stats = (torch.bmm(x, x.transpose(1, 2)), torch.bmm(y, x.transpose(1, 2)), (y ** 2).sum(2).reshape(-1),
                 y.sum(), (y ** 2).sum(), torch.tensor(float(y.shape[2])))
        part.append(tuple(s.double() for s in stats))  # summed in float64 over tens of thousands of positions
    return _moments(sums[0]), _moments(sums[1] or sums[0])


def _moments(parts: list[tuple[torch.Tensor, ...]]) -> LayerMoments:
    hessian, cross, energy, total, squares, count = (sum(p[k] for p in parts) for k in range(6))
    values = count * energy.numel()
    variance = float(squares / values - (total / values) ** 2)
    return LayerMoments((hessian / count).float(), (cross / count).float(), (energy / count).float(),
                        max(variance, 1e-12))


def learn_rounding(weight: np.ndarray, scale: np.ndarray, quantized: np.ndarray, fit: LayerMoments,
                   held_out: LayerMoments, group: int, *, steps: int = STEPS) -> tuple[np.ndarray, RoundingFit]:
    """The int8 weights (same shape and dtype as `quantized`) whose layer output best matches fp32's on `fit`.

    `weight` is the fp32 weight (out x in/group x kh x kw), `scale` its per-output-channel step, `quantized` the
    nearest rounding the quantizer wrote (its largest magnitude is the grid's limit: 127, or 64 with reduce_range).
    Returns the nearest rounding unchanged when learned rounding does not lower the error on `held_out`."""
    out_channels = weight.shape[0]
    limit = float(np.abs(quantized).max())
    steps_of = torch.from_numpy((weight / scale.reshape(-1, *[1] * (weight.ndim - 1))).astype(np.float32))
    steps_of = steps_of.reshape(group, out_channels // group, -1)
    floor = steps_of.floor()
    step = torch.from_numpy(scale.astype(np.float32)).reshape(group, out_channels // group, 1)

    def weights(integer_weights: torch.Tensor) -> torch.Tensor:
        return step * integer_weights.clamp(-limit, limit)

    nearest = torch.from_numpy(quantized.astype(np.float32)).reshape(floor.shape)
    rest = (steps_of - floor).clamp(1e-4, 1 - 1e-4)
    alpha = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_()  # h(alpha) == rest at the start
    optimiser = torch.optim.Adam([alpha], lr=LEARNING_RATE)
    warm = int(steps * WARM_UP)
    for k in range(steps):
        soft = (torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
        loss = fit.error(weights(floor + soft))
        if k >= warm:  # push every h to 0 or 1, gently at first (a high beta only bites near 0.5)
            beta = BETA_END + (BETA_START - BETA_END) * (1 - (k - warm) / max(1, steps - warm))
            loss = loss + REGULARISATION * (1 - (2 * soft - 1).abs().pow(beta)).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    learned = (floor + (alpha.detach() >= 0).float()).clamp(-limit, limit)
    result = RoundingFit(flipped=float((learned != nearest).float().mean()),
                         error_nearest=held_out.relative_error(weights(nearest)),
                         error_learned=held_out.relative_error(weights(learned)))
    chosen = learned if result.kept else nearest
    return chosen.reshape(quantized.shape).numpy().astype(quantized.dtype), result
