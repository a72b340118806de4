"""Learned rounding of int8 convolution weights: each weight rounded up or down to fit the layer's fp32 outputs (the
choice AdaRound makes: Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020).

Rounding each weight to its nearest int8 step is not what keeps a layer's outputs closest to fp32's: the errors of
a filter's weights add up over its inputs, and on the real EfficientNet-Lite0 weight rounding alone changed a tenth
of the top-1 answers on photographs (bias correction, which fixes only each channel's mean, took that to 5%). Here a
filter's rounding is chosen to minimise its output error on real inputs, E|conv(x_int8, w) - y_fp32|^2: a quadratic
in the filter's weights (its input patches' second moments, layer_moments), so the change any move of one or two
weights makes is exact and cheap to score, and a discrete descent over the up/down choices solves it directly.
AdaRound relaxes the same problem to soft rounding variables trained with Adam under an annealed regulariser; on
the real Lite0 the descent fits as well or better (mean KL divergence from fp32 on photo crops 0.0048 against
0.0055 as a VNNI CPU computes it, 0.0085 against 0.0087 with the avx2 preset: benchmarks/int8_rounding.py) in
milliseconds a layer instead of seconds. The scales stay what onnxruntime's quantizer chose; only the int8 values
change, by at most one step, so the file keeps its form and kernels.

onnxruntime's quantizer has no such pass (AIMET and Intel Neural Compressor have AdaRound, for their own graph
formats): it is written here in torch over the QDQ graph's small-filter Conv layers (MAX_FILTER_INPUTS), one at a
time, each fitted on the inputs the already-rounded layers before it produce (the "asymmetric" reconstruction of
the paper), to the fp32 graph's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F

# Only convs whose filters have few weights are re-rounded: depthwise ones (9 or 25 weights), an RGB stem (27). A
# filter of few weights cannot average its rounding errors away: on the real Lite0 its depthwise layers' rounding
# alone cost 8 points of agreement on photos. Their steps also cost about a millisecond, where a 1x1 conv over 1152
# channels costs 50 ms; and re-rounding every conv of Lite0 with AdaRound (minutes) agreed with fp32 no more often
# than re-rounding the depthwise ones and the stem: 94.7% of every photo crop (a probe; depthwise only: 92.8%).
# 1x1 convs over at most 32 channels qualify too (Lite0's first expansions); a squeeze-excitation's, which sees one
# position per image, is left alone by MIN_POSITIONS_PER_WEIGHT.
MAX_FILTER_INPUTS = 32
# Output positions per image the layer's statistics are taken over (whole rows: at least this many), and the share of
# images held out to check the fit.
POSITIONS_PER_IMAGE = 512
HELD_OUT = 0.2
# A layer is re-rounded only when fitted on at least this many output positions per weight of a filter (Lite0's
# smallest depthwise layers at 224 px: about 100; a 1x1 output of a tiny model: 6).
MIN_POSITIONS_PER_WEIGHT = 50


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
    """Whether a conv weight (out x in/group x kh x kw) is re-rounded: few weights a filter (MAX_FILTER_INPUTS)."""
    return int(np.prod(weight_shape[1:])) <= MAX_FILTER_INPUTS


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
    positions: int  # how many output positions the moments are taken over

    def error(self, weights: torch.Tensor) -> torch.Tensor:
        """Mean over positions of the squared output error, summed over channels."""
        return self.filter_errors(weights).sum()

    def filter_errors(self, weights: torch.Tensor) -> torch.Tensor:
        """The same per output channel (groups x outputs per group)."""
        quadratic = (torch.matmul(weights, self.hessian) * weights).sum(-1)
        return quadratic - 2 * (weights * self.cross).sum(-1) + self.energy.reshape(quadratic.shape)

    def relative_error(self, weights: torch.Tensor) -> float:
        with torch.no_grad():
            return float(self.error(weights)) / (len(self.energy) * self.variance)


def layer_moments(inputs: np.ndarray, outputs: np.ndarray, bias: np.ndarray | None, geometry: ConvGeometry,
                  kernel: tuple[int, ...], *, seed: int = 0) -> tuple[LayerMoments, LayerMoments]:
    """The moments of a conv over `inputs` (its input, N x C x H x W) and `outputs` (the fp32 layer's output there),
    on about POSITIONS_PER_IMAGE output positions of each image (whole rows, drawn at random): (on the first 80% of
    the images, on the rest)."""
    held = max(1, int(len(inputs) * HELD_OUT)) if len(inputs) > 1 else 0
    shift = None if bias is None else torch.from_numpy(bias.astype(np.float32))
    height, width = outputs.shape[2:]
    rows_wanted = min(height, -(-POSITIONS_PER_IMAGE // width))
    rows = np.sort(np.random.default_rng(seed).choice(height, size=rows_wanted, replace=False))
    split = len(inputs) - held
    fit = _moments_over(inputs[:split], outputs[:split], shift, geometry, kernel, rows)
    return fit, (_moments_over(inputs[split:], outputs[split:], shift, geometry, kernel, rows) if held else fit)


def _moments_over(inputs: np.ndarray, outputs: np.ndarray, shift: torch.Tensor | None, geometry: ConvGeometry,
                  kernel: tuple[int, ...], rows: np.ndarray) -> LayerMoments:
    """Summed over output `rows` of every image. Only the input strips those rows read are copied, and the patches
    are laid out for the matrix products by one strided copy (torch's unfold writes another layout, and costs more
    than the products: 2.6 s of 3 on a 240-channel 5x5 layer)."""
    top, left, bottom, right = geometry.pads
    (kh, kw), (sh, sw), (dh, dw) = kernel, geometry.strides, geometry.dilations
    extent = dh * (kh - 1) + 1
    x = F.pad(torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32)), (left, right, top, bottom))
    width = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    if (x.shape[2] - extent) // sh + 1 != outputs.shape[2] or width != outputs.shape[3]:
        raise ValueError(f"conv geometry does not give the layer's {tuple(outputs.shape[2:])} outputs")
    strips = torch.cat([x[:, :, r * sh:r * sh + extent] for r in rows])  # (row, image) x C x extent x W, contiguous
    channels, padded_width = strips.shape[1], strips.shape[3]
    count = len(strips) * width
    patches = strips.as_strided(  # C x kh x kw x strips x output columns, a view: [c, i, j, s, o] = strip s's pixel
        (channels, kh, kw, len(strips), width),  # (c, i*dh, o*sw + j*dw)
        (extent * padded_width, dh * padded_width, dw, channels * extent * padded_width, sw))
    x = patches.reshape(geometry.group, -1, count)  # groups x patch (channel, i, j: unfold's order) x positions
    y = torch.from_numpy(np.ascontiguousarray(outputs[:, :, rows], dtype=np.float32))  # N x outputs x rows x L
    if shift is not None:
        y = y - shift[None, :, None, None]
    y = y.permute(1, 2, 0, 3).reshape(geometry.group, -1, count)  # positions in the strips' order
    stats = (torch.bmm(x, x.transpose(1, 2)), torch.bmm(y, x.transpose(1, 2)), (y ** 2).sum(2).reshape(-1),
             y.sum(), (y ** 2).sum(), torch.tensor(float(count)))
    return _moments([tuple(s.double() for s in stats)])


def _moments(parts: list[tuple[torch.Tensor, ...]]) -> LayerMoments:
    hessian, cross, energy, total, squares, count = (sum(p[k] for p in parts) for k in range(6))
    values = count * energy.numel()
    variance = float(squares / values - (total / values) ** 2)
    return LayerMoments((hessian / count).float(), (cross / count).float(), (energy / count).float(),
                        max(variance, 1e-12), int(count))


def learn_rounding(weight: np.ndarray, scale: np.ndarray, quantized: np.ndarray, fit: LayerMoments,
                   held_out: LayerMoments, group: int) -> tuple[np.ndarray, RoundingFit]:
    """The int8 weights (same shape and dtype as `quantized`) whose layer output best matches fp32's on `fit`.

    `weight` is the fp32 weight (out x in/group x kh x kw), `scale` its per-output-channel step, `quantized` the
    nearest rounding the quantizer wrote (its largest magnitude is the grid's limit: 127, or 64 with reduce_range).
    Each weight may take either of its two neighbouring steps (AdaRound's choice). From the nearest rounding, every
    filter repeatedly makes the one move, of one weight or of two, that lowers its output error most, until none
    does: each filter's error is a small quadratic (patch x patch), so every candidate move's change is exact and
    all are scored at once. Returns the nearest rounding unchanged when the result does not lower the error on
    `held_out`."""
    out_channels = weight.shape[0]
    nearest_error = held_out.relative_error(torch.from_numpy(
        (quantized * scale.reshape(-1, *[1] * (weight.ndim - 1))).reshape(group, out_channels // group, -1)).float())
    if fit.positions < MIN_POSITIONS_PER_WEIGHT * int(np.prod(weight.shape[1:])):  # too few to tell signal from noise
        return quantized, RoundingFit(flipped=0.0, error_nearest=nearest_error, error_learned=nearest_error)
    limit = float(np.abs(quantized).max())
    steps_of = torch.from_numpy(weight / scale.reshape(-1, *[1] * (weight.ndim - 1))).double()
    steps_of = steps_of.reshape(group, out_channels // group, -1)
    floor = steps_of.floor()
    step = torch.from_numpy(scale.astype(np.float64)).reshape(group, out_channels // group, 1)
    hessian, cross = fit.hessian.double(), fit.cross.double()
    diagonal = torch.diagonal(hessian, dim1=1, dim2=2)[:, None, :]  # groups x 1 x patch
    nearest = torch.from_numpy(quantized.astype(np.float64)).reshape(floor.shape)
    current = nearest.clone()
    residual = torch.matmul(step * current, hessian) - cross  # H w - c: half the error's gradient in w
    # a move counts only if it lowers the error by more than float noise on the filter's own output scale
    tolerance = 1e-9 * fit.energy.double().reshape(group, out_channels // group)
    for _ in range(4 * current.shape[-1]):  # every move lowers the error; the cap only bounds the time
        other = torch.where(current > floor, floor, floor + 1)  # the other of a weight's two roundings
        move = torch.where(other.abs() <= limit, other - current, torch.zeros_like(current))  # in steps
        change = move * step
        gain = 2 * change * residual + change ** 2 * diagonal  # the error's change if that one weight moves
        # moving two weights: both gains and their coupling (escapes where no single move helps)
        pair = gain[..., :, None] + gain[..., None, :] + 2 * change[..., :, None] * change[..., None, :] * \
            hessian[:, None]
        pair = pair + torch.diag_embed(torch.full_like(gain, float("inf")))  # a weight cannot move twice
        best, where = torch.cat([gain, pair.flatten(-2)], -1).min(dim=-1)
        better = (best < -tolerance)[..., None]
        if not better.any():
            break
        size = gain.shape[-1]
        first = torch.where(where < size, where, (where - size) // size)
        second = torch.where(where < size, where, (where - size) % size)
        picked = torch.zeros_like(gain).scatter_(-1, first[..., None], 1.0)
        picked = picked.scatter_(-1, second[..., None], 1.0) * better  # one or two weights per filter
        moved = change * picked
        residual = residual + torch.matmul(moved, hessian)
        current = current + move * picked
    # each filter keeps its new rounding only where it also fits the held-out images better: the descent fits the
    # calibration images exactly, noise included (on the real Lite0's avx2 preset: mean KL from fp32 0.0111 without
    # this check, 0.0085 with it; 0.0049 and 0.0048 on avx512_vnni)
    learned_errors, nearest_errors = (held_out.filter_errors((step * w).float()) for w in (current, nearest))
    better_held_out = learned_errors < nearest_errors
    current = torch.where(better_held_out[..., None], current, nearest)
    result = RoundingFit(flipped=float((current != nearest).double().mean()),
                         error_nearest=held_out.relative_error((step * nearest).float()),
                         error_learned=held_out.relative_error((step * current).float()))
    kept = current if result.kept else nearest
    return kept.reshape(quantized.shape).numpy().astype(quantized.dtype), result
