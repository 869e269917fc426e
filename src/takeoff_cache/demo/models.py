"""Demo backbones: ONNX graphs with analytic (untrained) weights.

They stand in for trained networks so the whole pipeline runs without
downloading weights: a place-recognition descriptor that does not care
which way the camera points (soft histograms of colour and of Gabor texture
energy over a centred disc) and a Harris/gradient local-feature network.
Both are built from closed-form kernels, so the same arguments give
byte-identical ``.onnx`` files (no timestamps, fixed names), and the model
hash in a cache manifest is reproducible.

Inputs are ``(N, 3, size, size)`` float32 already normalised with the
ImageNet mean/std, as the pipeline feeds every backbone; the graphs undo that
normalisation inside their first 1x1 convolution.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from takeoff_cache.core.fsutil import atomic_write_bytes

PRODUCER = "takeoff-cache-demo"
OPSET = 17
# IR 8 is what opset 17 shipped with; every ONNX Runtime since 1.13 loads it.
IR_VERSION = 8
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# ITU-R BT.601 luma weights.
_LUMA = (0.299, 0.587, 0.114)

# Place recognition: soft histograms, over a centred disc, of normalised colour
# (7 bins per channel) and of Gabor texture energy at 3 octaves (5 bins each).
# A histogram over a disc does not change when the view turns about its centre,
# and a wide, soft window changes little when it is scaled or moved a little.
VPR_COLOUR_BINS = 7
VPR_TEXTURE_BINS = 5
VPR_LEVELS = 3
VPR_ORIENTATIONS = 6
VPR_DIM = VPR_COLOUR_BINS**3 + VPR_TEXTURE_BINS**VPR_LEVELS
# Cells the histograms are taken over. 32 x 32 colour cells retrieved no better
# (0.815 against 0.81 Recall@1) and cost 1 ms more a tile.
_COLOUR_CELLS = 16
_TEXTURE_CELLS = 16
# Gabor carrier wavelength and envelope width in pixels of the level it filters.
_GABOR_WAVELENGTH = 4.0
_GABOR_SIGMA = 2.0
# Bin centres span +-2 (colour) and +-1.5 (texture) image standard deviations;
# soft-assignment widths and the window were chosen on the demo corpus's
# any-angle self-test (200 views): sharper colour bins kept gaining down to
# 0.2 (sigma 0.4: Recall@1 0.71, 0.3: 0.76, 0.2: 0.80, 0.15: level), windows of
# 0.4 and 0.5 of the half-size lost 9 and 1.5 points; wider ones were level.
_COLOUR_RANGE, _COLOUR_SIGMA = 2.0, 0.2
_TEXTURE_RANGE, _TEXTURE_SIGMA = 1.5, 0.3
_WINDOW_SIGMA = 0.6  # of half the image size
# Texture block weight relative to the colour block (each is unit length).
_TEXTURE_WEIGHT = 0.5
# Floors that keep Sqrt, Log and Div finite on flat (e.g. all-black) images.
_ENERGY_EPS = 1e-6
_LOG_EPS = 1e-3
_STD_EPS = 1e-3
_NORM_EPS = 1e-12

# Local features: the K strongest Harris corners of a tile at its full size, each
# described by rings about it (see build_keypoints_model).
KEYPOINTS_SIZE = 256
KEYPOINTS = 256
KEYPOINT_RINGS = (2.0, 4.0, 6.5, 9.5, 13.0, 17.0)
KEYPOINT_ANGLES = 16
KEYPOINT_HARMONICS = 5
# Values a keypoint's descriptor has: 3 channels, each ring's mean and 4 harmonics.
KEYPOINT_DIM = 3 * len(KEYPOINT_RINGS) * KEYPOINT_HARMONICS
_KEYPOINT_MARGIN = 4
_DC_WEIGHT = 2.0
_HARRIS_K = 0.04

F32 = NDArray[np.float32]


# --------------------------------------------------------------------------- kernels
def _luma_conv() -> tuple[F32, F32]:
    """1x1 conv turning a normalised RGB image back into luma in [0, 1]."""
    w = np.array([[[[y * s]] for y, s in zip(_LUMA, STD, strict=True)]], dtype=np.float32)
    b = np.array([sum(y * m for y, m in zip(_LUMA, MEAN, strict=True))], dtype=np.float32)
    return w, b


def _gabor_bank(orientations: int, wavelength: float, sigma: float) -> F32:
    """Quadrature Gabor pairs, shape ``(2 * orientations, 1, k, k)``.

    Channel ``2o`` is the even (cosine) filter of orientation ``o`` and
    ``2o + 1`` the odd (sine) one; the sum of their squares is a phase-free
    energy, which is what makes the descriptor tolerate small shifts.
    """
    half = math.ceil(2.5 * sigma)
    r = np.arange(-half, half + 1, dtype=np.float64)
    yy, xx = np.meshgrid(r, r, indexing="ij")
    envelope = np.exp(-(xx**2 + yy**2) / (2.0 * sigma**2))
    bank = np.empty((2 * orientations, 1, r.size, r.size), dtype=np.float64)
    for o in range(orientations):
        theta = math.pi * o / orientations
        phase = 2.0 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / wavelength
        even = envelope * np.cos(phase)
        # The truncated cosine has a small DC term: remove it, so flat regions
        # (and the luma offset) give exactly zero response.
        even -= envelope * (even.sum() / envelope.sum())
        odd = envelope * np.sin(phase)
        bank[2 * o, 0] = even / envelope.sum()
        bank[2 * o + 1, 0] = odd / envelope.sum()
    return bank.astype(np.float32)


def _pair_sum(orientations: int) -> F32:
    """1x1 conv adding each even/odd pair of squared responses."""
    w = np.zeros((orientations, 2 * orientations, 1, 1), dtype=np.float32)
    for o in range(orientations):
        w[o, 2 * o] = w[o, 2 * o + 1] = 1.0
    return w


def _disc_window(cells: int) -> F32:
    """``(cells * cells, 1)`` pooling weights: a Gaussian about the centre, cut at the
    inscribed circle, summing to 1.

    Only the inscribed disc is seen whatever the heading (the corners of a turned
    view come from elsewhere), and the Gaussian makes content near the centre,
    which a view offset or scaled keeps, count more than content at the rim.
    """
    c = (np.arange(cells) + 0.5) / cells * 2.0 - 1.0
    yy, xx = np.meshgrid(c, c, indexing="ij")
    rho = np.sqrt(xx**2 + yy**2).ravel()
    w = np.exp(-(rho**2) / (2.0 * _WINDOW_SIGMA**2))
    w[rho > 1.0] = 0.0
    out: F32 = (w / w.sum()).reshape(-1, 1).astype(np.float32)
    return out


def _soft_bins(dims: int, bins: int, half_range: float, sigma: float) -> tuple[F32, F32]:
    """``(dims, bins ** dims)`` weights and bias whose softmax over the bins is a Gaussian
    soft assignment of a ``dims``-vector to a regular grid of centres.

    ``-|f - c|^2 / 2s^2 = (f.c - |c|^2 / 2) / s^2 - |f|^2 / 2s^2``, and the last
    term is the same for every centre, so softmax drops it: one MatMul is enough.
    """
    axis = np.linspace(-half_range, half_range, bins)
    centres = np.stack(np.meshgrid(*[axis] * dims, indexing="ij"), -1).reshape(-1, dims)
    w = (centres / sigma**2).T
    b = -(centres**2).sum(1) / (2.0 * sigma**2)
    return w.astype(np.float32), b.astype(np.float32)


def _gaussian(sigma: float) -> F32:
    half = math.ceil(2.5 * sigma)
    r = np.arange(-half, half + 1, dtype=np.float64)
    g = np.exp(-(r**2) / (2.0 * sigma**2))
    k = np.outer(g, g)
    out: F32 = (k / k.sum()).astype(np.float32)
    return out


def _oriented_derivatives(orientations: int, sigma: float) -> F32:
    """First derivatives of a Gaussian along ``orientations`` directions over 360 deg."""
    half = math.ceil(2.5 * sigma)
    r = np.arange(-half, half + 1, dtype=np.float64)
    yy, xx = np.meshgrid(r, r, indexing="ij")
    g = np.exp(-(xx**2 + yy**2) / (2.0 * sigma**2))
    out = np.empty((orientations, 1, r.size, r.size), dtype=np.float64)
    for o in range(orientations):
        theta = 2.0 * math.pi * o / orientations
        along = xx * math.cos(theta) + yy * math.sin(theta)
        d = -along * g
        out[o, 0] = d / np.abs(d).sum()
    return out.astype(np.float32)


# --------------------------------------------------------------------------- graph kit
class _Graph:
    """Collects nodes and initializers with deterministic, readable names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(self, name: str, value: NDArray[np.float32] | NDArray[np.int64]) -> str:
        self.inits.append(numpy_helper.from_array(value, name=name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        self._n += 1
        out = output or f"{op_type.lower()}_{self._n}"
        self.nodes.append(
            helper.make_node(op_type, inputs, [out], name=f"{op_type}_{self._n}", **attrs)
        )
        return out

    def conv(
        self,
        x: str,
        name: str,
        weight: F32,
        bias: F32 | None = None,
        *,
        stride: int = 1,
        group: int = 1,
    ) -> str:
        k = weight.shape[-1]
        inputs = [x, self.const(f"{name}.weight", weight)]
        if bias is not None:
            inputs.append(self.const(f"{name}.bias", bias))
        return self.op(
            "Conv",
            inputs,
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[k // 2] * 4,
            group=group,
        )

    def avg_pool(self, x: str, k: int) -> str:
        return self.op("AveragePool", [x], kernel_shape=[k, k], strides=[k, k])


def _image_input(size: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])


def _save(
    path: Path,
    graph: _Graph,
    name: str,
    size: int,
    outputs: list[onnx.ValueInfoProto],
    doc: str,
    inputs: list[onnx.ValueInfoProto] | None = None,
) -> None:
    """``inputs``: the graph's, where they are not the ``size`` px image of every other
    demo network (a matcher's)."""
    g = helper.make_graph(
        graph.nodes,
        name,
        inputs if inputs is not None else [_image_input(size)],
        outputs,
        graph.inits,
        doc_string=doc,
    )
    model = helper.make_model(
        g,
        producer_name=PRODUCER,
        producer_version="1",
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temporary file + fsync + os.replace: a reader never sees half a model.
    atomic_write_bytes(path, model.SerializeToString(deterministic=True))


# --------------------------------------------------------------------------- models
def _histogram(g: _Graph, features: str, name: str, cells: int, bins: F32, bias: F32) -> str:
    """Soft histogram of per-cell ``features`` (N, D, cells, cells) over the disc window,
    square-rooted (Hellinger: no one dominant bin decides the cosine) and unit length."""
    # Cells first, bins last: ONNX Runtime's Softmax over the last axis is ~15x
    # faster than over the channels of an NCHW tensor (measured on 32 x 32 cells:
    # 0.3 against 8.8 ms a tile). The bias rides in the MatMul on a constant-1
    # feature: the (cells x bins) tensor is the large one, and a separate Add
    # over it cost as much as the MatMul itself.
    ones = g.op(
        "ReduceMean",
        [g.op("Mul", [features, g.const(f"{name}_zero", np.zeros(1, np.float32))])],
        axes=[1],
        keepdims=1,
    )
    ones = g.op("Add", [ones, g.const(f"{name}_one", np.ones(1, np.float32))])
    stacked = g.op("Transpose", [g.op("Concat", [features, ones], axis=1)], perm=[0, 2, 3, 1])
    flat = g.op(
        "Reshape",
        [stacked, g.const(f"{name}_shape", np.array([0, -1, bins.shape[0] + 1], np.int64))],
    )
    logits = g.op("MatMul", [flat, g.const(f"{name}_bins", np.concatenate([bins, bias[None]]))])
    assign = g.op("Softmax", [logits], axis=-1)
    window = g.const(f"{name}_window", _disc_window(cells).T)
    hist = g.op("Sqrt", [g.op("MatMul", [window, assign])])  # (1, P) x (N, P, K)
    hist = g.op("Flatten", [hist], axis=1)
    norm = g.op("ReduceL2", [hist], axes=[1], keepdims=1)
    eps = g.const(f"{name}_eps", np.array(_NORM_EPS, np.float32))
    return g.op("Div", [hist, g.op("Max", [norm, eps])])


def build_vpr_model(path: Path, size: int = 128) -> None:
    """Write the place-recognition backbone: ``image`` (N,3,size,size) -> ``descriptor`` (N,D).

    ``D = VPR_DIM`` (468): a soft histogram of colour (343 bins), then one of
    texture (125 bins), over a centred disc, so that a view at any heading gives
    the same descriptor. Colour is taken relative to the image's mean and
    luma spread (brightness and contrast drop out); texture is the log Gabor
    energy, summed over orientations, at 3 octaves, relative to its image mean.
    The descriptor is not L2-normalised as a whole; the pipeline does that.
    ``size`` must be a multiple of 128 (three stride-2 levels, then 16 x 16 cells).
    """
    step = 2**VPR_LEVELS * _TEXTURE_CELLS
    if size < step or size % step:
        raise ValueError(f"size must be a positive multiple of {step}, got {size}")
    g = _Graph()

    # Colour: back to [0, 1] RGB, averaged into cells.
    rgb_w = np.diag(np.array(STD, np.float32)).reshape(3, 3, 1, 1)
    rgb = g.conv("image", "rgb", rgb_w, np.array(MEAN, np.float32))
    cells = g.avg_pool(rgb, size // _COLOUR_CELLS)
    centred = g.op("Sub", [cells, g.op("ReduceMean", [cells], axes=[2, 3], keepdims=1)])
    luma_w = np.array(_LUMA, np.float32).reshape(1, 3, 1, 1)
    luma_dev = g.conv(centred, "cell_luma", luma_w)
    spread = g.op("Sqrt", [g.op("ReduceMean", [g.op("Mul", [luma_dev, luma_dev])], axes=[2, 3])])
    spread = g.op("Add", [spread, g.const("std_eps", np.array(_STD_EPS, np.float32))])
    colour = _histogram(
        g,
        g.op("Div", [centred, spread]),
        "colour",
        _COLOUR_CELLS,
        *_soft_bins(3, VPR_COLOUR_BINS, _COLOUR_RANGE, _COLOUR_SIGMA),
    )

    # Texture: orientation-summed Gabor energy per octave, on 16 x 16 cells.
    luma_w, luma_b = _luma_conv()
    luma = g.conv("image", "luma", luma_w, luma_b)
    bank = _gabor_bank(VPR_ORIENTATIONS, _GABOR_WAVELENGTH, _GABOR_SIGMA)
    pairs = _pair_sum(VPR_ORIENTATIONS)
    eps = np.full(VPR_ORIENTATIONS, _ENERGY_EPS, dtype=np.float32)
    log_eps = g.const("log_eps", np.array(_LOG_EPS, dtype=np.float32))
    channels = g.const("channel_axis", np.array([1], np.int64))
    levels: list[str] = []
    level_in, res = luma, size
    for lv in range(VPR_LEVELS):
        if lv:
            # A pyramid instead of ever larger kernels: the same 11x11 bank on
            # a half-size image is an octave coarser at a quarter of the cost.
            level_in, res = g.avg_pool(level_in, 2), res // 2
        # Stride 2 is safe because the energy (not the raw response) is pooled.
        resp = g.conv(level_in, f"gabor{lv}", bank, stride=2)
        energy = g.op("Sqrt", [g.conv(g.op("Mul", [resp, resp]), f"pairs{lv}", pairs, eps)])
        # The sum over orientations is what does not change when the view turns.
        total = g.op("ReduceSum", [energy, channels])
        if res // 2 != _TEXTURE_CELLS:
            total = g.avg_pool(total, res // 2 // _TEXTURE_CELLS)
        # Log energy minus its image mean: invariant to contrast.
        log_e = g.op("Log", [g.op("Add", [total, log_eps])])
        levels.append(g.op("Sub", [log_e, g.op("ReduceMean", [log_e], axes=[2, 3], keepdims=1)]))
    texture = _histogram(
        g,
        g.op("Concat", levels, axis=1),
        "texture",
        _TEXTURE_CELLS,
        *_soft_bins(VPR_LEVELS, VPR_TEXTURE_BINS, _TEXTURE_RANGE, _TEXTURE_SIGMA),
    )
    weight = g.const("texture_weight", np.array(_TEXTURE_WEIGHT, dtype=np.float32))
    g.op("Concat", [colour, g.op("Mul", [texture, weight])], "descriptor", axis=1)
    out = helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, ["N", VPR_DIM])
    _save(
        path,
        g,
        "takeoff_cache_demo_vpr",
        size,
        [out],
        "Rotation-invariant demo descriptor: soft colour and Gabor-texture histograms"
        " over a centred disc.",
    )


def _polar_offsets(radii: tuple[float, ...], angles: int) -> tuple[F32, F32]:
    """``(R, A)`` x and y offsets in pixels: ``angles`` points on each ring of ``radii``."""
    theta = 2.0 * np.pi * np.arange(angles) / angles
    r = np.asarray(radii, dtype=np.float64)[:, None]
    return (r * np.cos(theta)).astype(np.float32), (r * np.sin(theta)).astype(np.float32)


def _angular_dft(angles: int, harmonics: int) -> tuple[F32, F32]:
    """``(A, M)`` cosine and sine matrices: harmonics 0..M-1 of a ring of ``angles`` samples."""
    theta = 2.0 * np.pi * np.arange(angles)[:, None] * np.arange(harmonics)[None, :] / angles
    return (np.cos(theta) / angles).astype(np.float32), (np.sin(theta) / angles).astype(np.float32)


def _opponent_conv() -> tuple[F32, F32]:
    """1x1 conv from a normalised RGB image to luma and two opponent colours in [0, 1] units."""
    rows = np.array([_LUMA, (0.5, -0.5, 0.0), (0.25, 0.25, -0.5)], dtype=np.float64)
    w = rows * np.asarray(STD)[None, :]
    b = rows @ np.asarray(MEAN)
    return w[:, :, None, None].astype(np.float32), b.astype(np.float32)


def build_keypoints_model(path: Path, size: int = KEYPOINTS_SIZE) -> None:
    """Write the local-feature backbone: ``image`` -> ``keypoints`` (N, K, 2), ``scores``
    (N, K) and ``descriptors`` (N, K, D), K = :data:`KEYPOINTS` (the contract of
    docs/backbones.md).

    Keypoints are the K strongest local maxima (5x5) of the Harris response
    (k = 0.04, on luma gradients at sigma 1.5), in pixels of the input, x then y,
    the centre of the top-left pixel at (0, 0); ``scores`` is their response.
    Descriptors do not change when the view turns: the blurred luma and two
    opponent colours are sampled on :data:`KEYPOINT_RINGS` rings of
    :data:`KEYPOINT_ANGLES` points about each keypoint, and each ring is
    summarised by what a turn leaves alone: its mean (less the patch mean) and
    the magnitudes of its angular harmonics 1..M-1, then the whole is made unit
    length (a change of contrast scales every term alike).
    """
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    g = _Graph()
    opp_w, opp_b = _opponent_conv()
    opponent = g.conv("image", "opponent", opp_w, opp_b)
    zero = g.const("ch0", np.array([0], np.int64))
    one = g.const("ch1", np.array([1], np.int64))
    axis1 = g.const("axis1", np.array([1], np.int64))
    luma = g.op("Slice", [opponent, zero, one, axis1])

    sobel_x = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float32) / 8.0
    grad = g.conv(luma, "sobel", np.stack([sobel_x, sobel_x.T])[:, None])
    gx = g.op("Slice", [grad, zero, one, axis1])
    gy = g.op("Slice", [grad, one, g.const("ch2", np.array([2], np.int64)), axis1])
    products = g.op(
        "Concat", [g.op("Mul", [gx, gx]), g.op("Mul", [gy, gy]), g.op("Mul", [gx, gy])], axis=1
    )
    window = np.repeat(_gaussian(1.5)[None, None], 3, axis=0)
    tensor = g.conv(products, "window", window, group=3)
    sxx = g.op("Slice", [tensor, zero, one, axis1])
    syy = g.op("Slice", [tensor, one, "ch2", axis1])
    sxy = g.op("Slice", [tensor, "ch2", g.const("ch3", np.array([3], np.int64)), axis1])
    det = g.op("Sub", [g.op("Mul", [sxx, syy]), g.op("Mul", [sxy, sxy])])
    trace = g.op("Add", [sxx, syy])
    k = g.const("harris_k", np.array(_HARRIS_K, dtype=np.float32))
    harris = g.op("Sub", [det, g.op("Mul", [k, g.op("Mul", [trace, trace])])])
    # Local maxima only, away from the border where the window runs off the image.
    peak = g.op("MaxPool", [harris], kernel_shape=[5, 5], strides=[1, 1], pads=[2, 2, 2, 2])
    is_peak = g.op("Cast", [g.op("Equal", [harris, peak])], to=TensorProto.FLOAT)
    border = np.zeros((1, 1, size, size), dtype=np.float32)
    m = _KEYPOINT_MARGIN
    border[..., m : size - m, m : size - m] = 1.0
    response = g.op("Mul", [g.op("Mul", [harris, is_peak]), g.const("border", border)])
    flat = g.op("Reshape", [response, g.const("flat_shape", np.array([0, -1], np.int64))])
    # TopK's second output, the flat index of each keypoint, gives its x and y.
    g.op("TopK", [flat, g.const("k", np.array([KEYPOINTS], np.int64))], "scores", axis=1)
    index = "topk_index"
    g.nodes[-1].output.append(index)
    width = g.const("width", np.array(size, np.int64))
    xs = g.op("Cast", [g.op("Mod", [index, width])], to=TensorProto.FLOAT)
    ys = g.op("Cast", [g.op("Div", [index, width])], to=TensorProto.FLOAT)
    last = g.const("last_axis", np.array([2], np.int64))
    pair = [g.op("Unsqueeze", [xs, last]), g.op("Unsqueeze", [ys, last])]
    g.op("Concat", pair, "keypoints", axis=2)

    # Polar samples of the blurred image about each keypoint: GridSample's grid is in
    # [-1, 1] (align_corners=0: pixel i's centre at (2i + 1) / size - 1).
    blurred = g.conv(opponent, "blur", np.repeat(_gaussian(1.0)[None, None], 3, axis=0), group=3)
    off_x, off_y = _polar_offsets(KEYPOINT_RINGS, KEYPOINT_ANGLES)
    rings, angles = off_x.shape
    k4 = g.const("k4", np.array([3], np.int64))
    scale = g.const("to_grid", np.array(2.0 / size, np.float32))
    shift = g.const("grid_shift", np.array(1.0 / size - 1.0, np.float32))

    def grid_axis(coord: str, offsets: F32, name: str) -> str:
        ring = g.const(name, offsets.reshape(1, 1, -1))
        pts = g.op("Add", [g.op("Unsqueeze", [coord, last]), ring])
        return g.op("Add", [g.op("Mul", [pts, scale]), shift])  # (N, K, R * A)

    gxs, gys = grid_axis(xs, off_x, "ring_x"), grid_axis(ys, off_y, "ring_y")
    grid = g.op("Concat", [g.op("Unsqueeze", [gxs, k4]), g.op("Unsqueeze", [gys, k4])], axis=3)
    grid = g.op(
        "Reshape",
        [grid, g.const("grid_shape", np.array([0, KEYPOINTS * rings, angles, 2], np.int64))],
    )
    samples = g.op(
        "GridSample", [blurred, grid], mode="bilinear", padding_mode="border", align_corners=0
    )  # (N, 3, K * R, A)
    samples = g.op(
        "Reshape",
        [samples, g.const("ring_shape", np.array([0, 3, KEYPOINTS, rings, angles], np.int64))],
    )
    cos_m, sin_m = _angular_dft(angles, KEYPOINT_HARMONICS)
    re = g.op("MatMul", [samples, g.const("dft_cos", cos_m)])  # (N, 3, K, R, M)
    im = g.op("MatMul", [samples, g.const("dft_sin", sin_m)])
    power = g.op("Add", [g.op("Mul", [re, re]), g.op("Mul", [im, im])])
    eps = g.const("mag_eps", np.array(1e-8, np.float32))
    ac = g.op(
        "Sqrt",
        [
            g.op(
                "Add",
                [
                    g.op(
                        "Slice",
                        [
                            power,
                            one,
                            g.const("m_end", np.array([KEYPOINT_HARMONICS], np.int64)),
                            g.const("axis4", np.array([4], np.int64)),
                        ],
                    ),
                    eps,
                ],
            )
        ],
    )
    mean = g.op("Slice", [re, zero, one, "axis4"])  # (N, 3, K, R, 1): ring means
    centred = g.op("Sub", [mean, g.op("ReduceMean", [mean], axes=[3], keepdims=1)])
    dc_weight = g.const("dc_weight", np.array(_DC_WEIGHT, np.float32))
    parts = g.op("Concat", [g.op("Mul", [centred, dc_weight]), ac], axis=4)
    desc = g.op("Transpose", [parts], perm=[0, 2, 1, 3, 4])  # (N, K, 3, R, M)
    desc = g.op("Reshape", [desc, g.const("desc_shape", np.array([0, KEYPOINTS, -1], np.int64))])
    norm = g.op(
        "Sqrt",
        [
            g.op(
                "Add",
                [
                    g.op("ReduceSumSquare", [desc], axes=[2], keepdims=1),
                    g.const("desc_eps", np.array(1e-12, np.float32)),
                ],
            )
        ],
    )
    g.op("Div", [desc, norm], "descriptors")
    dim = 3 * rings * KEYPOINT_HARMONICS
    outputs = [
        helper.make_tensor_value_info("keypoints", TensorProto.FLOAT, ["N", KEYPOINTS, 2]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", KEYPOINTS]),
        helper.make_tensor_value_info("descriptors", TensorProto.FLOAT, ["N", KEYPOINTS, dim]),
    ]
    _save(
        path,
        g,
        "takeoff_cache_demo_keypoints",
        size,
        outputs,
        "Demo local features: Harris corners with ring descriptors that ignore the heading.",
    )


def build_weak_vpr_model(path: Path, size: int = 128) -> None:
    """Write a deliberately weak place-recognition backbone: ``image`` -> ``descriptor`` (N, 3).

    The descriptor is the image's mean normalised colour, nothing else: it
    ignores layout and texture, so neighbouring fields of one crop look the
    same to it. It is built like the demo backbone so that a self-test can be
    shown failing on the very same corpus and pipeline.
    """
    g = _Graph()
    g.op("Flatten", [g.op("GlobalAveragePool", ["image"])], "descriptor", axis=1)
    out = helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, ["N", 3])
    _save(
        path,
        g,
        "takeoff_cache_demo_weak_vpr",
        size,
        [out],
        "Weak demo descriptor: the mean colour of the image.",
    )


# A pair of the demo's unit descriptors at a cosine below this is no match: the
# matcher contract's "score above 0" (docs/backbones.md) is the cosine above it.
MATCHER_MIN_COSINE = 0.5


def build_matcher_model(path: Path, dim: int = KEYPOINT_DIM, *, negate: bool = False) -> None:
    """Write an analytic matcher (docs/backbones.md): ``descriptors0`` (1, N, dim) and
    ``descriptors1`` (1, M, dim), with ``keypoints0`` (1, N, 2) and ``keypoints1``
    (1, M, 2), -> ``scores`` (1, N, M), the cosine of each pair of unit descriptors
    less :data:`MATCHER_MIN_COSINE`.

    It takes the keypoints, as the contract allows, and leaves them alone: the
    cosine alone decides. ``negate`` writes a deliberately wrong one (the negated
    scores: each keypoint's best match is its least alike), so that a test can show
    the matcher, not anything after it, deciding the matches. Not part of the demo's
    backbones: tests write their own backbones file with it.
    """
    sign = -1.0 if negate else 1.0
    g = _Graph()
    cosine = g.op("MatMul", ["descriptors0", g.op("Transpose", ["descriptors1"], perm=[0, 2, 1])])
    g.op(
        "Add",
        [
            g.op("Mul", [cosine, g.const("sign", np.array(sign, np.float32))]),
            g.const("offset", np.array(-sign * MATCHER_MIN_COSINE, np.float32)),
        ],
        "scores",
    )
    inputs = [
        helper.make_tensor_value_info("descriptors0", TensorProto.FLOAT, [1, "N", dim]),
        helper.make_tensor_value_info("descriptors1", TensorProto.FLOAT, [1, "M", dim]),
        helper.make_tensor_value_info("keypoints0", TensorProto.FLOAT, [1, "N", 2]),
        helper.make_tensor_value_info("keypoints1", TensorProto.FLOAT, [1, "M", 2]),
    ]
    _save(
        path,
        g,
        "takeoff_cache_demo_negated_matcher" if negate else "takeoff_cache_demo_matcher",
        0,
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, "N", "M"])],
        "Demo matcher: the cosine of each pair of descriptors, less a margin.",
        inputs,
    )
