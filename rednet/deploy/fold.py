"""BatchNorm folding on an exported ONNX graph.

In eval mode a BatchNorm is a per-channel affine map, y = s * x + t with s = gamma / sqrt(var + eps)
and t = beta - mean * s. After a convolution it folds into the convolution's weights and bias
(W' = s * W, b' = s * b + t), so it costs nothing at inference. RedNet also has BatchNorms right
after an involution (``bn2`` of every block, the stem's), whose kernels are computed at run time:
those become one Mul and one Add, the same affine map in standard operators.

This runs on the ONNX graph rather than on the PyTorch modules, so it needs no knowledge of the
model: every BatchNormalization node goes, whatever produced its input.
"""

from __future__ import annotations

import numpy as np


def drop_initializer_identities(model) -> None:
    """Removes Identity nodes that only alias an initializer (the exporter writes one per
    parameter whose values equal another's), pointing their consumers at the initializer."""
    graph = model.graph
    inits = {init.name for init in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs}
    kept = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = alias.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)


def drop_unused_initializers(model) -> None:
    """Removes the initializers that no node reads (Loop bodies included) and no output names."""
    def read(nodes) -> set[str]:
        names = set()
        for node in nodes:
            names.update(node.input)
            for attr in node.attribute:
                if attr.g.node:
                    names |= read(attr.g.node)
        return names

    graph = model.graph
    needed = read(graph.node) | {o.name for o in graph.output}
    kept = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def fold_batchnorm(model):
    """Folds every BatchNormalization of ``model`` (in place) into the Conv that produces its input,
    or, where no Conv does, turns it into Mul + Add. Returns the model."""
    from onnx import helper, numpy_helper

    drop_initializer_identities(model)
    graph = model.graph
    protos = {init.name: init for init in graph.initializer}

    def value(name: str) -> np.ndarray:
        return numpy_helper.to_array(protos[name]).astype(np.float64)

    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    producer = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}
    new_inits, nodes = [], []

    def add(name: str, array: np.ndarray) -> str:
        new_inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    for node in graph.node:
        if node.op_type != "BatchNormalization":
            nodes.append(node)
            continue
        if len(node.output) > 1 and any(node.output[1:]):
            raise ValueError(f"{node.name}: a BatchNormalization in training mode cannot be folded")
        eps = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (value(name) for name in node.input[1:5])
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
        conv = producer.get(node.input[0])
        if (conv is not None and conv.op_type == "Conv" and consumers[node.input[0]] == 1
                and node.input[0] not in outputs and conv.input[1] in protos):
            weight = value(conv.input[1])
            bias = value(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else 0.0
            conv.input[1:] = [add(f"{node.name}/folded_weight", weight * scale[:, None, None, None]),
                              add(f"{node.name}/folded_bias", bias * scale + shift)]
            conv.output[0] = node.output[0]
        else:
            shape = (-1,) + (1,) * 2  # per channel of (B, C, H, W)
            scaled = helper.make_node("Mul", [node.input[0], add(f"{node.name}/scale", scale.reshape(shape))],
                                      [f"{node.name}/scaled"], name=f"{node.name}/Mul")
            shifted = helper.make_node("Add", [scaled.output[0], add(f"{node.name}/shift", shift.reshape(shape))],
                                       [node.output[0]], name=f"{node.name}/Add")
            nodes.extend([scaled, shifted])
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    drop_unused_initializers(model)  # the BatchNorms' parameters and the folded Convs' old weights
    return model
