"""Involution in standard ONNX operators, so that any ONNX runtime runs an exported RedNet.

The exporter writes each involution as one placeholder node, ``rednet::Involution(x, kernel_map)``
(:mod:`rednet.deploy.export`), and :func:`expand_involutions` replaces every placeholder by the
operators of a *formulation*. ``x`` is (B, C, H, W) and ``kernel_map`` the kernel generator's
output (B, G*K*K, Ho, Wo); group g covers channels [g*C/G, (g+1)*C/G), as in
:func:`rednet.ops.involution`. Every formulation accepts any batch and any image size: a tap is a
``Slice`` of the padded input whose bounds are counted from the ends, never from a fixed size.

ONNX Runtime runs every operator over its whole input and writes its whole output, so a
formulation costs what its operators move through memory and how fast their kernels are. Its
matrix products (MLAS) are the fastest kernels it has; its element-wise ones run at a fraction of
that, and Slice and the variadic Sum on one thread. The formulations, compared by
``scripts/bench_onnx.py --formulations`` (README, "Deploy"):

* ``band`` (the default wherever the kernel generator ends in a 1x1 convolution, as in every
  model of :mod:`rednet.models`): two matrix products. A tile of 7 or 8 neighbouring output pixels of
  one row reads a window of K input rows by Wt columns, gathered once, channels last; each output
  pixel is its row of a *band* matrix (its K*K kernel values at the window columns it reads,
  zeros elsewhere) times the window. The band comes straight out of the generator's 1x1
  convolution, written as a MatMul whose weights are laid out with those zeros, and one Slice
  shifts each pixel's row to its place (:func:`_band_core`). The zeros double the multiply-adds,
  which MLAS does an order of magnitude faster than the element-wise taps below do theirs.
* ``shift``: K*K shifted Slice/Mul/Add over the whole batch. Every pass streams the whole
  activation through main memory (the issue measured 0.39x ResNet-50's images/s for RedNet-26).
* ``unfold``: the K*K taps concatenated, then one Mul and one ReduceSum: fewer operators, but
  the concatenated taps are K*K times the input.
* ``rows``: the same per kernel row (K taps concatenated, one Mul and one ReduceSum).
* ``onehot``: a depthwise Conv with fixed one-hot kernels unfolds the input in one operator, then
  Mul and ReduceSum. The Conv does K*K times the useful multiply-adds, but on all threads.
* ``loop``: the ``shift`` taps inside an ONNX ``Loop`` over chunks of a few (sample, group) pairs,
  so that a chunk's input, taps and running sum stay in the CPU's caches.
* ``flat``: as ``loop``, with each tap one contiguous run per channel: the padded chunk is
  flattened row by row, so tap (u, v) is the 1-D slice starting u*Wq + v (a 2-D slice copies one
  image row at a time, and a strided one element by element; a stride s first splits the chunk
  into its s*s phase images). The fastest of those that need only the kernel map.
* ``auto`` (the default): ``band`` where the kernel map comes from a 1x1 convolution, else
  ``flat``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from rednet.deploy.fold import drop_unused_initializers
from rednet.ops.involution import output_size

DOMAIN = "rednet"  # the placeholder's operator domain, gone from the finished file
OP_TYPE = "Involution"
_END = np.iinfo(np.int64).max  # a Slice end meaning "to the end of the axis"

# A Loop chunk holds about this many input elements (128 KiB of float32), so that the chunk, its
# padded copy, a tap and the running sum fit in a core's L2 cache. Measured on RedNet-26's
# involutions at batch 8 (flat): 2^15 and 2^16 alike, 2^14 1.1x and 2^17 1.9x slower.
CHUNK_ELEMENTS = 1 << 15
# A trip of ``band``'s Loop gathers windows of about this many values (16 MiB of float32) at most:
# a whole batch at once would hold K*Wt/t times the activation in windows, 14x for a 7x7
# involution, 11 MiB a sample for RedNet's stage 1 at 224 px (2 GiB for RedNet-26 at batch 32).
BAND_ELEMENTS = 1 << 22
# Output pixels per tile of ``band``: each involution takes the one that pads its output width (at
# the size the model is exported at) least, the first on a tie. A width that is no whole number
# of tiles is padded to one, which costs: at 256 px, 7-pixel tiles padded RedNet-26's last stages
# (16 and 8 wide) by 31% and 75%. At 224 px every width is a multiple of 7, and tiles of 6 and 8
# ran RedNet-26's 56-wide stage alike and its 14-wide stage 22-31% slower.
TILES = (7, 8)


@dataclass(frozen=True)
class Geometry:
    kernel_size: int
    stride: int
    dilation: int
    channels: int
    groups: int
    # (sample, group) pairs per Loop iteration of ``loop`` and ``flat``, and samples per Loop
    # iteration of ``band``, chosen at export for the input size the model is exported at (any
    # size runs; only the speed and the memory depend on them).
    chunk: int = 1
    samples: int = 1
    tile: int = TILES[0]  # output pixels per tile of ``band``, chosen likewise

    @property
    def group_channels(self) -> int:
        return self.channels // self.groups

    @property
    def taps(self) -> int:
        return self.kernel_size * self.kernel_size

    @property
    def padding(self) -> int:
        return self.dilation * (self.kernel_size - 1) // 2

    @property
    def window_width(self) -> int:
        """Columns of ``band``'s window: s*(tile-1) + K, rounded up to whole units of a tile."""
        return -(-(self.stride * (self.tile - 1) + self.kernel_size) // self.tile) * self.tile

    def output_size(self, size: int) -> int:
        return output_size(size, self.kernel_size, self.stride, self.dilation)


def for_input(geometry: Geometry, height: int, width: int) -> Geometry:
    """``geometry`` with the sizes chosen at export for a ``height`` x ``width`` input: Loop
    chunks of about CHUNK_ELEMENTS input values (``loop``, ``flat``), and the tile that pads the
    output width least and Loop trips of about BAND_ELEMENTS gathered values (``band``)."""
    g = geometry
    wo = g.output_size(width)
    tile = min(TILES, key=lambda t: (-(-wo // t) * t, TILES.index(t)))
    g = replace(g, chunk=max(1, CHUNK_ELEMENTS // (g.group_channels * height * width)), tile=tile)
    window = g.groups * g.output_size(height) * -(-wo // tile) * g.kernel_size * g.window_width * g.group_channels
    return replace(g, samples=max(1, BAND_ELEMENTS // window))


def _dim(b: "GraphBuilder", name: str, axis: int) -> str:
    """The size of ``name``'s ``axis``, as a 1-element int64 tensor."""
    return b.op("Slice", [b.op("Shape", [name]), b.const([axis]), b.const([axis + 1])])


class GraphBuilder:
    """Appends ONNX nodes and constant initializers under one name prefix."""

    def __init__(self, prefix: str, initializers: list | None = None) -> None:
        self.prefix = prefix
        self.nodes: list = []
        self.initializers = [] if initializers is None else initializers
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def const(self, values, dtype=np.int64) -> str:
        from onnx import numpy_helper

        name = self.name("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, **attrs):
        from onnx import helper

        names = outputs if isinstance(outputs, list) else [self.name(op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.name(op_type + "_node"), **attrs))
        return names[0] if len(names) == 1 else names

    def subgraph(self, hint: str) -> GraphBuilder:
        """A builder for a Loop body: its own nodes, constants shared with the main graph."""
        return GraphBuilder(self.name(hint), self.initializers)


# Building blocks on grouped tensors: x (M, C/G, H, W) and kernels (M, K*K, Ho, Wo), M = B*G.

def _taps(b: GraphBuilder, x: str, geo: Geometry) -> list[str]:
    """Every tap's view of ``x`` (row-major), as Slices of the zero-padded input."""
    p, k, d, s = geo.padding, geo.kernel_size, geo.dilation, geo.stride
    padded = b.op("Pad", [x, b.const([0, 0, p, p, 0, 0, p, p])]) if p else x
    taps = []
    for u in range(k):
        for v in range(k):
            # Tap (u, v) reads rows u*d, u*d + s, ... up to the padded height minus what the
            # remaining taps need: counting the end from the far side makes any size work.
            ends = [u * d - 2 * p or _END, v * d - 2 * p or _END]
            taps.append(b.op("Slice", [padded, b.const([u * d, v * d]), b.const(ends), b.const([2, 3]),
                                       b.const([s, s])]))
    return taps


def _spatial_shape(b: GraphBuilder, kernels: str) -> str:
    return b.op("Slice", [b.op("Shape", [kernels]), b.const([2]), b.const([4])])


def _shift(b: GraphBuilder, x: str, kernels: str, geo: Geometry) -> str:
    taps = _taps(b, x, geo)
    weights = b.op("Split", [kernels], outputs=geo.taps, axis=1)  # K*K maps of (M, 1, Ho, Wo)
    out = None
    for tap, weight in zip(taps, weights):
        term = b.op("Mul", [tap, weight])
        out = term if out is None else b.op("Add", [out, term])
    return out


def _reduce_taps(b: GraphBuilder, taps: list[str], kernels: str, geo: Geometry) -> str:
    """sum_t taps[t] * kernels[:, t] as one Concat, one Mul and one ReduceSum."""
    n, cg = len(taps), geo.group_channels
    stacked = b.op("Reshape", [b.op("Concat", taps, axis=1), b.const([0, n, cg, -1])])  # (M, n, C/G, Ho*Wo)
    weights = b.op("Reshape", [kernels, b.const([0, n, 1, -1])])
    return b.op("ReduceSum", [b.op("Mul", [stacked, weights]), b.const([1])], keepdims=0)  # (M, C/G, Ho*Wo)


def _unfold(b: GraphBuilder, x: str, kernels: str, geo: Geometry) -> str:
    flat = _reduce_taps(b, _taps(b, x, geo), kernels, geo)
    return b.op("Reshape", [flat, b.op("Concat", [b.const([0, geo.group_channels]), _spatial_shape(b, kernels)],
                                       axis=0)])


def _rows(b: GraphBuilder, x: str, kernels: str, geo: Geometry) -> str:
    k = geo.kernel_size
    taps = _taps(b, x, geo)
    row_kernels = b.op("Split", [kernels], outputs=k, axis=1) if k > 1 else [kernels]
    flat = b.op("Sum", [_reduce_taps(b, taps[u * k:(u + 1) * k], row_kernels[u], geo) for u in range(k)])
    return b.op("Reshape", [flat, b.op("Concat", [b.const([0, geo.group_channels]), _spatial_shape(b, kernels)],
                                       axis=0)])


def _flat(b: GraphBuilder, x: str, kernels: str, geo: Geometry, layout: dict) -> str:
    """The taps as 1-D slices of the padded image flattened row by row (``layout`` from
    :func:`_flat_layout`).

    With rows of Wq elements, tap (u, v) of output position m = i*Wq + j reads the flat image at
    m + u*Wq + v: one contiguous run per channel, where a 2-D slice copies Wo elements at a time.
    The output is computed on the padded grid of Ho x Wq, and the Wq - Wo extra columns (which
    read into the next row) are dropped at the end. A stride s splits the padded image into its
    s*s phase images x[a::s, b::s] once; tap (u, v) is then a stride-1 tap of phase (u%s, v%s).
    """
    k, s, d = geo.kernel_size, geo.stride, geo.dilation
    padded = b.op("Pad", [x, layout["pads"]])
    phases = {}
    for a in range(s):
        for c in range(s):
            phase = padded if s == 1 else b.op("Slice", [padded, b.const([a, c]), b.const([_END, _END]),
                                                        b.const([2, 3]), b.const([s, s])])
            phases[a, c] = b.op("Reshape", [phase, b.const([0, 0, -1])])  # (M, C/G, Hq*Wq)
    padded = b.op("Pad", [kernels, layout["kernel_pads"]])
    weights = b.op("Split", [b.op("Reshape", [padded, b.const([0, geo.taps, -1])])],
                   outputs=geo.taps, axis=1) if geo.taps > 1 else [b.op("Reshape", [kernels, b.const([0, 1, -1])])]
    out = None
    for u in range(k):
        for v in range(k):
            t = u * k + v
            tap = b.op("Slice", [phases[(u * d) % s, (v * d) % s], layout["starts"][t], layout["ends"][t],
                                 b.const([2])])
            term = b.op("Mul", [tap, weights[t]])
            out = term if out is None else b.op("Add", [out, term])
    out = b.op("Reshape", [out, layout["grid"]])  # (M, C/G, Ho, Wq)
    return b.op("Slice", [out, b.const([0]), layout["wo"], b.const([3])])


def _flat_layout(b: GraphBuilder, x: str, kernels: str, geo: Geometry) -> dict:
    """The sizes :func:`_flat` needs, computed once from the input's shape (outside any Loop)."""
    k, s, d, p = geo.kernel_size, geo.stride, geo.dilation, geo.padding
    hw = b.op("Slice", [b.op("Shape", [x]), b.const([2]), b.const([4])])
    howo = _spatial_shape(b, kernels)
    # Phase images of Hq x Wq: the padded image rounded up to whole strides, plus one stride of
    # rows so that the extra columns of the last output row read zeros, not past the end.
    hq_wq = b.op("Add", [b.op("Div", [b.op("Add", [hw, b.const([2 * p + s - 1] * 2)]), b.const([s, s])]),
                         b.const([1, 0])])
    after = b.op("Sub", [b.op("Mul", [hq_wq, b.const([s, s])]), b.op("Add", [hw, b.const([p, p])])])
    zeros = b.const([0, 0])
    pads = b.op("Concat", [zeros, b.const([p, p]), zeros, after], axis=0)
    wq = b.op("Slice", [hq_wq, b.const([1]), b.const([2])])
    wo = b.op("Slice", [howo, b.const([1]), b.const([2])])
    kernel_pads = b.op("Concat", [b.const([0, 0, 0, 0, 0, 0, 0]), b.op("Sub", [wq, wo])], axis=0)
    length = b.op("Mul", [b.op("Slice", [howo, b.const([0]), b.const([1])]), wq])  # Ho * Wq
    grid = b.op("Concat", [b.const([0, geo.group_channels]), b.op("Slice", [howo, b.const([0]), b.const([1])]), wq],
                axis=0)
    # Tap (u, v) starts (u*d // s) rows and (v*d // s) columns into its phase image: all K*K
    # offsets in one vector, split into the 1-element tensors Slice takes.
    rows = [(u * d) // s for u in range(k) for v in range(k)]
    cols = [(v * d) // s for u in range(k) for v in range(k)]
    starts = b.op("Add", [b.op("Mul", [wq, b.const(rows)]), b.const(cols)])
    ends = b.op("Add", [starts, length])
    if geo.taps > 1:
        starts, ends = b.op("Split", [starts], outputs=geo.taps), b.op("Split", [ends], outputs=geo.taps)
    else:
        starts, ends = [starts], [ends]
    return {"pads": pads, "kernel_pads": kernel_pads, "starts": starts, "ends": ends, "grid": grid, "wo": wo}


def _loop(b: GraphBuilder, tensors: list[str], chunk: int, core, channels: int, spatial_of: str) -> str:
    """``core`` inside a Loop over chunks of about ``chunk`` entries of the first axis of every
    tensor in ``tensors``: ``core(body, [chunk of each tensor])`` returns the chunk's output,
    (chunk, ``channels``, Ho, Wo), with Ho and Wo those of ``spatial_of``'s last two axes.

    A Loop's scan output must have the same shape in every iteration, so the M entries are split
    into ``trips = ceil(M / chunk)`` chunks of ``size = ceil(M / trips)`` (balanced: fewer than
    ``trips`` entries of zeros are padded on), and the padding is sliced off the stacked result.
    Chunks of one entry need no padding, and get none: a Pad copies its input even when it adds
    nothing (3% of RedNet-26's time at batch 8 in ONNX Runtime).
    """
    from onnx import TensorProto, helper

    one = b.const([1])
    entries = _dim(b, tensors[0], 0)  # M
    if chunk == 1:
        trips, size, padded = entries, one, tensors
    else:
        trips = b.op("Max", [b.op("Div", [b.op("Add", [entries, b.const([chunk - 1])]), b.const([chunk])]), one])
        size = b.op("Div", [b.op("Add", [entries, b.op("Sub", [trips, one])]), trips])
        extra = b.op("Sub", [b.op("Mul", [trips, size]), entries])
        pads = b.op("Concat", [b.const([0, 0, 0, 0]), extra, b.const([0, 0, 0])], axis=0)
        padded = [b.op("Pad", [t, pads]) for t in tensors]

    body = b.subgraph("loop")
    i, cond = body.name("i"), body.name("cond")
    start = body.op("Mul", [body.op("Unsqueeze", [i, b.const([0])]), size])
    end = body.op("Add", [start, size])
    out = core(body, [body.op("Slice", [t, start, end, b.const([0])]) for t in padded])
    cond_out = body.op("Identity", [cond])
    graph = helper.make_graph(
        body.nodes, body.prefix,
        [helper.make_tensor_value_info(i, TensorProto.INT64, []),
         helper.make_tensor_value_info(cond, TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []),
         helper.make_tensor_value_info(out, TensorProto.FLOAT, ["size", channels, "ho", "wo"])])
    # An explicit condition of true: the standard lets it be left empty, but onnx's reference
    # runtime then runs no trip at all.
    stacked = b.op("Loop", [b.op("Squeeze", [trips, b.const([0])]), b.const(np.array(True), np.bool_)],
                   body=graph)  # (trips, size, channels, Ho, Wo)
    shape = b.op("Concat", [b.const([-1, channels]), _spatial_shape(b, spatial_of)], axis=0)
    out = b.op("Reshape", [stacked, shape])
    return out if chunk == 1 else b.op("Slice", [out, b.const([0]), entries, b.const([0])])


def _in_chunks(core):
    """``core`` inside a Loop over chunks of about ``geo.chunk`` (sample, group) pairs."""
    def looped(b: GraphBuilder, x: str, kernels: str, geo: Geometry) -> str:
        layout = {"layout": _flat_layout(b, x, kernels, geo)} if core is _flat else {}
        return _loop(b, [x, kernels], geo.chunk, lambda body, chunks: core(body, *chunks, geo, **layout),
                     geo.group_channels, kernels)
    return looped


def _onehot(b: GraphBuilder, x: str, kernels: str, geo: Geometry) -> str:
    """On ungrouped tensors: a depthwise Conv with one one-hot K x K kernel per tap unfolds x."""
    k, c, p = geo.kernel_size, geo.channels, geo.padding
    eye = np.tile(np.eye(geo.taps, dtype=np.float32).reshape(geo.taps, 1, k, k), (c, 1, 1, 1))
    cols = b.op("Conv", [x, b.const(eye, np.float32)], group=c, kernel_shape=[k, k], pads=[p] * 4,
                strides=[geo.stride] * 2, dilations=[geo.dilation] * 2)  # (B, C*K*K, Ho, Wo), channel-major
    cols = b.op("Reshape", [cols, b.const([0, geo.groups, geo.group_channels, geo.taps, -1])])
    weights = b.op("Reshape", [kernels, b.const([0, geo.groups, 1, geo.taps, -1])])
    flat = b.op("ReduceSum", [b.op("Mul", [cols, weights]), b.const([3])], keepdims=0)  # (B, G, C/G, Ho*Wo)
    return b.op("Reshape", [flat, b.op("Concat", [b.const([0, c]), _spatial_shape(b, kernels)], axis=0)])


@dataclass(frozen=True)
class Generator:
    """The last layer of an involution's kernel generator, a 1x1 convolution: per pixel,
    kernels = weight @ reduced + bias. ``reduced`` is the name of its input (B, J, Ho, Wo) in the
    graph; ``weight`` is (G*K*K, J) and ``bias`` (G*K*K,), BatchNorm already folded in."""

    reduced: str
    weight: np.ndarray
    bias: np.ndarray


def _band(b: GraphBuilder, x: str, gen: Generator, geo: Geometry) -> str:
    """:func:`_band_core` in a Loop over chunks of ``geo.samples`` samples, which bounds the memory
    its windows take (BAND_ELEMENTS)."""
    return _loop(b, [x, gen.reduced], geo.samples,
                 lambda body, chunks: _band_core(body, chunks[0], replace(gen, reduced=chunks[1]), geo),
                 geo.channels, gen.reduced)


def _band_core(b: GraphBuilder, x: str, gen: Generator, geo: Geometry) -> str:
    """Involution as two matrix products, on ungrouped tensors (see the module's docstring).

    A tile is ``t`` = ``geo.tile`` neighbouring output pixels of one row of one (sample, group) pair. They
    read a window of the padded input of K rows by Wt = s*(t-1) + K columns, channels last: a
    (K*Wt, C/G) matrix, gathered once per tile. Output pixel i of the tile is row i of a *band*
    matrix (t, K*Wt) times the window, where band row i holds the pixel's K*K kernel values at
    columns u*Wt + s*i + v and zeros elsewhere: out (t, C/G) = band @ window.

    The band comes from the generator's 1x1 convolution: a MatMul of the reduced features (one
    extra channel of ones for the bias) with the generator's weights laid out at columns
    u*Wt + v of a row of K*Wt + s, zeros between. Reading those rows back with a row length of
    K*Wt shifts row i by s*i (the skew): one Slice of each tile's first t*K*Wt values.

    The window is gathered in units of t pixels (t*C/G values: Gather copies large units several
    times faster than single pixels), so its width Wt is rounded up to whole units and the padded
    input to a whole number of units per row.
    """
    k, s, p, cg, groups, t = geo.kernel_size, geo.stride, geo.padding, geo.group_channels, geo.groups, geo.tile
    reduced_channels = gen.weight.shape[1]
    wt = geo.window_width
    units = wt // t  # units of t pixels per window row
    row = k * wt + s
    c = b.const

    def ceil_to(value: str, multiple: int) -> str:
        return b.op("Mul", [b.op("Div", [b.op("Add", [value, c([multiple - 1])]), c([multiple])]), c([multiple])])

    h, w = _dim(b, x, 2), _dim(b, x, 3)
    ho, wo = _dim(b, gen.reduced, 2), _dim(b, gen.reduced, 3)
    wo_tiles = ceil_to(wo, t)  # output columns, whole tiles

    # The band: (tiles, t, K*Wt), tiles ordered (sample, group, row, tile of the row).
    weight = np.concatenate([gen.weight, gen.bias[:, None]], 1).reshape(groups, k, k, reduced_channels + 1)
    layout = np.zeros((groups, reduced_channels + 1, k, wt), np.float32)
    layout[..., :k] = weight.transpose(0, 3, 1, 2)
    layout = np.concatenate([layout.reshape(groups, reduced_channels + 1, k * wt),
                             np.zeros((groups, reduced_channels + 1, s), np.float32)], 2)  # (G, J+1, row)
    ones = c(np.array(1, np.float32), np.float32)  # the bias channel; also fills the padded columns (discarded)
    reduced = b.op("Pad", [gen.reduced, b.op("Concat", [c([0, 0, 0, 0, 0, 1, 0]), b.op("Sub", [wo_tiles, wo])], axis=0),
                           ones])
    reduced = b.op("Transpose", [b.op("Reshape", [reduced, c([0, reduced_channels + 1, -1])])], perm=[0, 2, 1])
    rows = b.op("MatMul", [b.op("Unsqueeze", [reduced, c([1])]), c(layout, np.float32)])  # (B, G, Ho*Wo', row)
    band = b.op("Slice", [b.op("Reshape", [rows, c([-1, t * row])]), c([0]), c([t * k * wt]), c([1])])
    band = b.op("Reshape", [band, c([-1, t, k * wt])])

    # The windows: x channels last per (sample, group), zero-padded, in units of t pixels.
    wp = ceil_to(b.op("Max", [b.op("Add", [b.op("Mul", [b.op("Sub", [wo_tiles, c([t])]), c([s])]), c([wt])]),
                              b.op("Add", [w, c([p])])]), t)
    hp = b.op("Add", [h, c([2 * p])])
    xt = b.op("Transpose", [b.op("Reshape", [x, b.op("Concat", [c([-1, cg]), b.op("Mul", [h, w])], axis=0)])],
              perm=[0, 2, 1])  # (B*G, H*W, C/G)
    xt = b.op("Reshape", [xt, b.op("Concat", [c([0]), h, w, c([cg])], axis=0)])
    xt = b.op("Pad", [xt, b.op("Concat", [c([0, p, p, 0, 0, p]), b.op("Sub", [wp, b.op("Add", [w, c([p])])]), c([0])],
                                        axis=0)])
    units_of = b.op("Reshape", [xt, c([-1, t * cg])])  # (B*G*Hp*Wp/t, t*C/G)
    wp_units = b.op("Div", [wp, c([t])])

    def steps(count: str, step: str, shape: list[int]) -> str:
        return b.op("Reshape", [b.op("Mul", [b.op("Range", [c(0), b.op("Squeeze", [count]), c(1)]), step]), c(shape)])

    pairs = _dim(b, xt, 0)
    start = b.op("Add", [b.op("Add", [steps(pairs, b.op("Mul", [hp, wp_units]), [-1, 1, 1]),
                                     steps(ho, b.op("Mul", [wp_units, c([s])]), [1, -1, 1])]),
                         steps(b.op("Div", [wo_tiles, c([t])]), c([s]), [1, 1, -1])])  # first unit of each window
    offsets = b.op("Add", [b.op("Mul", [wp_units, c([u for u in range(k) for _ in range(units)])]),
                           c([q for _ in range(k) for q in range(units)])])
    index = b.op("Add", [b.op("Reshape", [start, c([-1, 1])]), offsets])
    window = b.op("Reshape", [b.op("Gather", [units_of, index], axis=0), c([-1, k * wt, cg])])

    out = b.op("MatMul", [band, window])  # (tiles, t, C/G)
    out = b.op("Reshape", [out, b.op("Concat", [c([-1]), ho, wo_tiles, c([cg])], axis=0)])
    out = b.op("Reshape", [b.op("Slice", [out, c([0]), wo, c([2])]), c([0, -1, cg])])
    out = b.op("Transpose", [out], perm=[0, 2, 1])  # (B*G, C/G, Ho*Wo)
    return b.op("Reshape", [out, b.op("Concat", [c([-1, geo.channels]), ho, wo], axis=0)])


# name -> (builder, what it works on): "grouped" builders get x as (B*G, C/G, H, W) and the kernel
# map as (B*G, K*K, Ho, Wo), "whole" ones the (B, C, H, W) and (B, G*K*K, Ho, Wo) tensors, and
# "generator" ones x and the kernel generator's last convolution (:class:`Generator`) instead of
# its output.
FORMULATIONS = {
    "band": (_band, "generator"),
    "loop": (_in_chunks(_shift), "grouped"),
    "flat": (_in_chunks(_flat), "grouped"),
    "shift": (_shift, "grouped"),
    "unfold": (_unfold, "grouped"),
    "rows": (_rows, "grouped"),
    "onehot": (_onehot, "whole"),
}
# The default: ``band`` wherever the kernel map comes straight from a 1x1 convolution (every
# involution of rednet.models), else ``flat``, the fastest of the formulations that only need the
# kernel map (scripts/bench_onnx.py).
DEFAULT = "auto"


def build_involution(b: GraphBuilder, x: str, kernels: str, out: str, geo: Geometry, formulation: str = DEFAULT,
                     generator: Generator | None = None) -> bool:
    """Appends to ``b`` the nodes computing ``out`` (B, C, Ho, Wo) from ``x`` (B, C, H, W) and
    ``kernels`` (B, G*K*K, Ho, Wo), or from ``generator`` (the convolution that computes
    ``kernels``) where the formulation uses it. Returns whether it used ``generator``."""
    if formulation == DEFAULT:
        formulation = "band" if generator is not None and geo.dilation == 1 else "flat"
    build, takes = FORMULATIONS[formulation]
    if takes == "generator":
        if generator is None or geo.dilation != 1:
            raise ValueError(f"the {formulation!r} formulation needs the kernel generator's 1x1 convolution "
                             "and a dilation of 1")
        b.op("Identity", [build(b, x, generator, geo)], outputs=[out])
        return True
    if takes == "whole":
        b.op("Identity", [build(b, x, kernels, geo)], outputs=[out])
        return False
    xg = b.op("Reshape", [x, b.const([-1, geo.group_channels, 0, 0])])  # (B*G, C/G, H, W): free
    kg = b.op("Reshape", [kernels, b.const([-1, geo.taps, 0, 0])])  # (B*G, K*K, Ho, Wo)
    b.op("Reshape", [build(b, xg, kg, geo), b.const([-1, geo.channels, 0, 0])], outputs=[out])
    return False


def find_generator(graph, kernels: str) -> tuple[Generator, int] | None:
    """The 1x1 Conv (with constant weights, and bias if any) that computes ``kernels`` and nothing
    else, as a :class:`Generator` and the node's index; None if ``kernels`` comes from anything
    else."""
    from onnx import helper, numpy_helper

    position = next((i for i, n in enumerate(graph.node) if kernels in n.output), None)
    node = graph.node[position] if position is not None else None
    if node is None or node.op_type != "Conv":
        return None
    readers = sum(name == kernels for n in graph.node for name in n.input)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    inits = {init.name: init for init in graph.initializer}
    has_bias = len(node.input) > 2 and node.input[2] != ""
    if (readers != 1 or node.input[1] not in inits or (has_bias and node.input[2] not in inits)
            or attrs.get("group", 1) != 1 or any(attrs.get(a, [1, 1]) != [1, 1] for a in ("strides", "dilations"))
            or any(attrs.get("pads", [0, 0, 0, 0]))):
        return None
    weight = numpy_helper.to_array(inits[node.input[1]])
    if weight.shape[2:] != (1, 1):
        return None
    bias = numpy_helper.to_array(inits[node.input[2]]) if has_bias else np.zeros(weight.shape[0])
    return Generator(node.input[0], weight[:, :, 0, 0].astype(np.float32), bias.astype(np.float32)), position


def expand_involutions(model, formulation: str = DEFAULT):
    """Replaces every ``rednet::Involution`` placeholder of the ONNX ``model`` (in place) by
    standard operators, and drops the ``rednet`` domain from its imports. Where the formulation
    computes the kernels itself (``band``), the generator's convolution that fed the placeholder
    goes too."""
    from onnx import helper

    if formulation not in FORMULATIONS and formulation != DEFAULT:
        raise ValueError(f"unknown involution formulation {formulation!r}; choose one of "
                         f"{sorted(FORMULATIONS) + [DEFAULT]}")
    graph = model.graph
    replaced, dropped = {}, set()
    for index, node in enumerate(graph.node):
        if node.domain != DOMAIN:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        found = find_generator(graph, node.input[1])
        b = GraphBuilder(node.name or f"involution_{index}")
        if build_involution(b, node.input[0], node.input[1], node.output[0], Geometry(**attrs), formulation,
                            found[0] if found else None):
            dropped.add(found[1])
        graph.initializer.extend(b.initializers)
        replaced[index] = b.nodes
    nodes = []
    for index, node in enumerate(graph.node):
        if index not in dropped:
            nodes.extend(replaced.get(index, [node]))
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(model)  # the weights of the generator convolutions band absorbed
    kept = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model
