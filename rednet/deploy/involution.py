"""Involution in standard ONNX operators, so that any ONNX runtime runs an exported RedNet.

The exporter writes each involution as one placeholder node, ``rednet::Involution(x, kernel_map)``
(:mod:`rednet.deploy.export`), and :func:`expand_involutions` replaces every placeholder by the
operators of a *formulation*. ``x`` is (B, C, H, W) and ``kernel_map`` the kernel generator's
output (B, G*K*K, Ho, Wo); group g covers channels [g*C/G, (g+1)*C/G), as in
:func:`rednet.ops.involution`. Every formulation accepts any batch and any image size: a tap is a
``Slice`` of the padded input whose bounds are counted from the ends, never from a fixed size.

ONNX Runtime runs every operator over its whole input and writes its whole output, so an
involution costs what its operators move through memory: K*K taps, each a copy (Slice), a Mul and
an addition over a tensor as large as the input, where PyTorch's ``shift`` does one fused,
cache-sized multiply-add per tap. Two things in ONNX Runtime 1.32's CPU kernels shape the choice:
Slice and the variadic Sum run on one thread, and Mul/Add split across threads. The
formulations, compared by ``scripts/bench_onnx.py --formulations`` (README, "Deploy"):

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
  into its s*s phase images).
* ``auto`` (the default): ``flat`` for 7x7 kernels, ``onehot`` for 3x3 ones (the stem).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DOMAIN = "rednet"  # the placeholder's operator domain, gone from the finished file
OP_TYPE = "Involution"
_END = np.iinfo(np.int64).max  # a Slice end meaning "to the end of the axis"

# A Loop chunk holds about this many input elements (128 KiB of float32), so that the chunk, its
# padded copy, a tap and the running sum fit in a core's L2 cache. Measured on RedNet-26's
# involutions at batch 8 (flat): 2^15 and 2^16 alike, 2^14 1.1x and 2^17 1.9x slower.
CHUNK_ELEMENTS = 1 << 15


@dataclass(frozen=True)
class Geometry:
    kernel_size: int
    stride: int
    dilation: int
    channels: int
    groups: int
    # (sample, group) pairs per Loop iteration, chosen at export for the input size the model is
    # exported at (any size runs; only the speed depends on it).
    chunk: int = 1

    @property
    def group_channels(self) -> int:
        return self.channels // self.groups

    @property
    def taps(self) -> int:
        return self.kernel_size * self.kernel_size

    @property
    def padding(self) -> int:
        return self.dilation * (self.kernel_size - 1) // 2


def chunk_for(geometry: Geometry, height: int, width: int) -> int:
    """How many (sample, group) pairs of a ``height`` x ``width`` input make a chunk of about
    CHUNK_ELEMENTS."""
    return max(1, CHUNK_ELEMENTS // (geometry.group_channels * height * width))


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
    weights = b.op("Split", [b.op("Reshape", [b.op("Pad", [kernels, layout["kernel_pads"]]), b.const([0, geo.taps, -1])])],
                   outputs=geo.taps, axis=1) if geo.taps > 1 else [b.op("Reshape", [kernels, b.const([0, 1, -1])])]
    out = None
    for u in range(k):
        for v in range(k):
            t = u * k + v
            tap = b.op("Slice", [phases[(u * d) % s, (v * d) % s], layout["starts"][t], layout["ends"][t], b.const([2])])
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


def _in_chunks(core):
    """``core`` inside a Loop over chunks of about ``geo.chunk`` (sample, group) pairs.

    A Loop's scan output must have the same shape in every iteration, so the M pairs are split
    into ``trips = ceil(M / chunk)`` chunks of ``size = ceil(M / trips)`` (balanced: fewer than
    ``trips`` pairs of zeros are padded on), and the padding is sliced off the stacked result.
    """
    def looped(b: GraphBuilder, x: str, kernels: str, geo: Geometry) -> str:
        from onnx import TensorProto, helper

        one = b.const([1])
        pairs = b.op("Slice", [b.op("Shape", [x]), b.const([0]), one])  # M, as a 1-element tensor
        trips = b.op("Max", [b.op("Div", [b.op("Add", [pairs, b.const([geo.chunk - 1])]), b.const([geo.chunk])]),
                             one])
        size = b.op("Div", [b.op("Add", [pairs, b.op("Sub", [trips, one])]), trips])
        extra = b.op("Sub", [b.op("Mul", [trips, size]), pairs])
        pads = b.op("Concat", [b.const([0, 0, 0, 0]), extra, b.const([0, 0, 0])], axis=0)
        x_padded, k_padded = b.op("Pad", [x, pads]), b.op("Pad", [kernels, pads])

        body = b.subgraph("loop")
        i, cond = body.name("i"), body.name("cond")
        start = body.op("Mul", [body.op("Unsqueeze", [i, b.const([0])]), size])
        end = body.op("Add", [start, size])
        layout = {"layout": _flat_layout(b, x, kernels, geo)} if core is _flat else {}
        out = core(body, body.op("Slice", [x_padded, start, end, b.const([0])]),
                   body.op("Slice", [k_padded, start, end, b.const([0])]), geo, **layout)
        cond_out = body.op("Identity", [cond])
        graph = helper.make_graph(
            body.nodes, body.prefix,
            [helper.make_tensor_value_info(i, TensorProto.INT64, []),
             helper.make_tensor_value_info(cond, TensorProto.BOOL, [])],
            [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []),
             helper.make_tensor_value_info(out, TensorProto.FLOAT, ["size", geo.group_channels, "ho", "wo"])])
        stacked = b.op("Loop", [b.op("Squeeze", [trips, b.const([0])]), ""], body=graph)  # (trips, size, C/G, Ho, Wo)
        shape = b.op("Concat", [b.const([-1, geo.group_channels]), _spatial_shape(b, kernels)], axis=0)
        return b.op("Slice", [b.op("Reshape", [stacked, shape]), b.const([0]), pairs, b.const([0])])
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


# name -> (builder, whether it works on grouped tensors)
FORMULATIONS = {
    "loop": (_in_chunks(_shift), True),
    "flat": (_in_chunks(_flat), True),
    "shift": (_shift, True),
    "unfold": (_unfold, True),
    "rows": (_rows, True),
    "onehot": (_onehot, False),
}
# The default: ``flat`` for 7x7 kernels; for 3x3 ones (RedNet's stem, on the largest maps) the
# ``onehot`` convolution, which wastes only 9 multiply-adds per output and runs as one parallel
# convolution, measured 2x faster than ``flat`` there (scripts/bench_onnx.py).
DEFAULT = "auto"


def build_involution(b: GraphBuilder, x: str, kernels: str, out: str, geo: Geometry, formulation: str = DEFAULT) -> None:
    """Appends to ``b`` the nodes computing ``out`` (B, C, Ho, Wo) from ``x`` (B, C, H, W) and
    ``kernels`` (B, G*K*K, Ho, Wo)."""
    if formulation == DEFAULT:
        formulation = "onehot" if geo.kernel_size <= 3 else "flat"
    build, grouped = FORMULATIONS[formulation]
    if not grouped:
        b.op("Identity", [build(b, x, kernels, geo)], outputs=[out])
        return
    xg = b.op("Reshape", [x, b.const([-1, geo.group_channels, 0, 0])])  # (B*G, C/G, H, W): free
    kg = b.op("Reshape", [kernels, b.const([-1, geo.taps, 0, 0])])  # (B*G, K*K, Ho, Wo)
    b.op("Reshape", [build(b, xg, kg, geo), b.const([-1, geo.channels, 0, 0])], outputs=[out])


def expand_involutions(model, formulation: str = DEFAULT):
    """Replaces every ``rednet::Involution`` placeholder of the ONNX ``model`` (in place) by
    standard operators, and drops the ``rednet`` domain from its imports."""
    from onnx import helper

    if formulation not in FORMULATIONS and formulation != DEFAULT:
        raise ValueError(f"unknown involution formulation {formulation!r}; choose one of "
                         f"{sorted(FORMULATIONS) + [DEFAULT]}")
    graph = model.graph
    nodes = []
    for index, node in enumerate(graph.node):
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        geo = Geometry(**attrs)
        b = GraphBuilder(node.name or f"involution_{index}")
        build_involution(b, node.input[0], node.input[1], node.output[0], geo, formulation)
        graph.initializer.extend(b.initializers)
        nodes.extend(b.nodes)
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model
