"""Rewrites of the exported graphs that decide what ONNX Runtime training holds in memory between the passes.

ONNX Runtime keeps every forward tensor a gradient node reads until that node runs, and its default order runs a
node as soon as its inputs exist. What that costs an emulator, and the rewrite that fixes it:

- `weights_read_in_place`: a linear layer exported as `MatMul(x, Transpose(W))` keeps the transposed copy of W
  for dX = dY·W, so every weight is held twice through the step; Gemm(x, W, transB=1) reads W in place.
- `dequantize_at_use`, `dequantize_again_for_backward`: an int8 weight's DequantizeLinear has only stored inputs,
  so it would run first and its float copy would live until the backward pass (more memory than float storage).
  Each reader gets its own dequantization instead, gated on the activation or gradient it multiplies.
- `recompute_layers`: the forward tensors of each decoder layer that its gradient reads (attention
  probabilities, MLP activations: ~15 k floats per token per layer for SmolLM2) are computed again from the
  layer's input when its backward pass starts, so only each layer's input stays between the passes.

A gate makes a node wait for a tensor g without changing its input x: `Reshape(x, Shape(x) + int(g₀ < g₀))`
(ONNX Runtime's Reshape aliases its input, so the gate copies nothing).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
from onnx import helper

GEMM_ZERO, GEMM_LAST, GATE_ZERO, GATE_ONE = "gemm/zero", "gemm/last", "gate/zero", "gate/one"
GRADIENT_MARKS = ("_Grad/", "_grad")  # ONNX Runtime's gradient builder names its nodes and tensors so
RECOMPUTE = "/recompute"  # the suffix of a recomputed forward tensor (and of its node's name)


def _int64(name: str, values: list[int]) -> onnx.TensorProto:
    return helper.make_tensor(name, onnx.TensorProto.INT64, [len(values)], values)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _is_gradient(node: onnx.NodeProto) -> bool:
    """A node of the backward pass (or of a recomputation for it), or a gradient accumulator."""
    return any(mark in node.name for mark in (*GRADIENT_MARKS, RECOMPUTE)) or "Accumulat" in node.op_type


def _gemm_nodes(matmul: onnx.NodeProto, weight: str) -> list[onnx.NodeProto]:
    """`x @ Wᵀ` for x [..., in]: Flatten to [rows, in], Gemm(·, W, transB=1), Reshape back to [..., out]."""
    (x, _), (y,), base = matmul.input, matmul.output, matmul.name or matmul.output[0]
    make = helper.make_node
    return [
        make("Shape", [x], [f"{base}/shape"], name=f"{base}/Shape"),
        make("Slice", [f"{base}/shape", GEMM_ZERO, GEMM_LAST], [f"{base}/lead"], name=f"{base}/Slice"),
        make("Concat", [f"{base}/lead", GEMM_LAST], [f"{base}/out_shape"], name=f"{base}/Concat", axis=0),
        make("Flatten", [x], [f"{base}/rows"], name=f"{base}/Flatten", axis=-1),
        make("Gemm", [f"{base}/rows", weight], [f"{base}/product"], name=f"{base}/Gemm", transB=1),
        make("Reshape", [f"{base}/product", f"{base}/out_shape"], [y], name=f"{base}/Reshape"),
    ]


def weights_read_in_place(model: onnx.ModelProto) -> int:
    """Rewrite each `MatMul(x, Transpose(W))` of a matrix W (a linear layer's weight) as Gemm with transB, in
    place; return how many. (FusedMatMul would read W in place too, but ONNX Runtime 1.19's gradient builder has
    no rule for it.)"""
    graph = model.graph
    users = _consumers(graph)
    rewritten: dict[str, list[onnx.NodeProto]] = {}
    dropped: set[str] = set()
    for node in graph.node:
        perm = [list(attribute.ints) for attribute in node.attribute if attribute.name == "perm"]
        if node.op_type != "Transpose" or perm != [[1, 0]]:
            continue
        readers = users.get(node.output[0], [])
        if not readers or any(user.op_type != "MatMul" or user.input[1] != node.output[0] for user in readers):
            continue
        for user in readers:
            rewritten[user.output[0]] = _gemm_nodes(user, node.input[0])
        dropped.add(node.output[0])
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type == "Transpose" and node.output[0] in dropped:
            continue
        nodes.extend(rewritten.get(node.output[0], [node]) if node.op_type == "MatMul" else [node])
    _replace_nodes(graph, nodes)
    if rewritten:
        graph.initializer.extend([_int64(GEMM_ZERO, [0]), _int64(GEMM_LAST, [-1])])
    return len(rewritten)


def _gated(tensor: str, gate: str, output: str) -> list[onnx.NodeProto]:
    """`tensor` again as `output`, unchanged, but only once tensor `gate` exists.

    The dependency goes through one value of `gate` (v < v is false for every v, NaN included), not through its
    shape: ONNX Runtime's training optimizers merge Shape nodes of tensors with the same symbolic shape.
    """
    make = helper.make_node
    return [
        make("Flatten", [gate], [f"{output}/gate_rows"], name=f"{output}/GateFlatten", axis=0),
        make(
            "Slice",
            [f"{output}/gate_rows", GATE_ZERO, GATE_ONE, GATE_ONE],
            [f"{output}/gate_value"],
            name=f"{output}/GateSlice",
        ),
        make("ReduceMin", [f"{output}/gate_value"], [f"{output}/gate_scalar"], name=f"{output}/GateScalar", keepdims=0),
        make(
            "Less",
            [f"{output}/gate_scalar", f"{output}/gate_scalar"],
            [f"{output}/gate_false"],
            name=f"{output}/GateFalse",
        ),
        make(
            "Cast",
            [f"{output}/gate_false"],
            [f"{output}/gate_zero"],
            name=f"{output}/GateZero",
            to=onnx.TensorProto.INT64,
        ),
        make("Shape", [tensor], [f"{output}/shape"], name=f"{output}/Shape"),
        make("Add", [f"{output}/shape", f"{output}/gate_zero"], [f"{output}/gated_shape"], name=f"{output}/Gated"),
        make("Reshape", [tensor, f"{output}/gated_shape"], [output], name=f"{output}/Reshape"),
    ]


def _with_gate_constants(graph: onnx.GraphProto) -> None:
    if not any(tensor.name == GATE_ZERO for tensor in graph.initializer):
        graph.initializer.extend([_int64(GATE_ZERO, [0]), _int64(GATE_ONE, [1])])


def _stored_dequantizations(graph: onnx.GraphProto) -> dict[str, tuple[str, str]]:
    """(int8 values, scale) of each DequantizeLinear of a stored weight, by output name.

    Stored: an initializer or graph input, or an Identity, Slice (a head dequantized slice by slice) or gate of
    one; gates are looked through, so a gated copy names the stored values it reads.
    """
    stored = {tensor.name: tensor.name for tensor in graph.initializer} | {v.name: v.name for v in graph.input}
    for node in graph.node:  # in order, so chains resolve
        if node.op_type in ("Identity", "Slice") and node.input[0] in stored:
            stored[node.output[0]] = node.output[0]
        elif node.op_type == "Reshape" and node.name.endswith("/Reshape") and node.input[0] in stored:
            stored[node.output[0]] = stored[node.input[0]]  # a gate: the same tensor
    return {
        node.output[0]: (stored[node.input[0]], stored[node.input[1]])
        for node in graph.node
        if node.op_type == "DequantizeLinear" and node.input[0] in stored and node.input[1] in stored
    }


def _gate_uses(graph: onnx.GraphProto, is_reader: Callable[[onnx.NodeProto], bool], suffix: str) -> int:
    """Give every reader of a stored dequantization its own copy, gated on the reader's other input; count.

    Nodes are handled through one list of the graph's nodes (protobuf makes a new wrapper object per iteration,
    so node identity holds only within one list)."""
    sources = _stored_dequantizations(graph)
    nodes, out, count = list(graph.node), [], 0
    for node in nodes:
        if is_reader(node) and any(name in sources for name in node.input):
            for slot, name in enumerate(node.input):
                if name not in sources:
                    continue
                values, scale = sources[name]
                gate = next(other for other in node.input if other and other != name)
                copy = f"{values}/{suffix}{count}"
                out.extend(_gated(values, gate, f"{copy}/values"))
                out.append(
                    helper.make_node(
                        "DequantizeLinear", [f"{copy}/values", scale], [copy], name=f"{copy}/Dequantize", axis=0
                    )
                )
                node.input[slot] = copy
                count += 1
        out.append(node)
    if count:
        read = {name for node in out for name in node.input} | {value.name for value in graph.output}
        out = [node for node in out if node.op_type != "DequantizeLinear" or node.output[0] in read]
        _replace_nodes(graph, out)
        _with_gate_constants(graph)
    return count


def _replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    copies = []
    for node in nodes:  # copied out first: clearing the field would invalidate wrappers of its own messages
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copies.append(copy)
    del graph.node[:]
    graph.node.extend(copies)


def dequantize_at_use(model: onnx.ModelProto) -> int:
    """Forward graph: each reader of an int8 weight dequantizes it itself, once its activation exists; count."""
    return _gate_uses(model.graph, lambda node: True, "dequantized")


def dequantize_again_for_backward(model: onnx.ModelProto) -> int:
    """Training graph: each gradient (or recomputing) node that reads a forward dequantization gets its own,
    gated on the gradient it multiplies, so the forward's float copy dies with the forward matmul; count."""
    return _gate_uses(model.graph, _is_gradient, "dequantized_backward")


def _layer_of(node: onnx.NodeProto, prefixes: list[str]) -> int | None:
    return next((index for index, prefix in enumerate(prefixes) if node.name.startswith(prefix)), None)


def recompute_layers(model: onnx.ModelProto, scope: str) -> int:
    """Training graph: recompute each decoder layer's forward tensors its backward pass reads (scope: the
    layers' node-name prefix, e.g. '/model/layers.'), gated on the gradient of the layer's output; count layers.

    A layer's output (the next layer's input) stays the one tensor kept between the passes; a tensor the forward
    pass reads outside the layer (a layer output, the rotary tables, the mask) is never recomputed.
    """
    graph = model.graph
    nodes = list(graph.node)  # one list: node identity holds only within it
    indices = sorted({int(node.name[len(scope) :].split("/")[0]) for node in nodes if node.name.startswith(scope)})
    prefixes = [f"{scope}{index}/" for index in indices]
    producers = {output: node for node in nodes for output in node.output}
    forward = [node for node in nodes if not _is_gradient(node)]
    layer = {id(node): _layer_of(node, prefixes) for node in forward}
    read_outside: dict[int, set[str]] = {}  # per layer: its tensors read by forward nodes of other parts
    for node in forward:
        for name in node.input:
            owner = producers.get(name)
            if owner is not None and layer.get(id(owner)) is not None and layer[id(owner)] != layer[id(node)]:
                read_outside.setdefault(layer[id(owner)], set()).add(name)
    available = {output for node in nodes for output in node.output}
    dequantized = _stored_dequantizations(graph)  # read as they are: the backward rewrite gates its own copies
    order = {id(node): index for index, node in enumerate(nodes)}
    before: dict[int, list[onnx.NodeProto]] = {}
    done = 0
    for position in range(len(prefixes)):
        members = [node for node in forward if layer[id(node)] == position]
        produced = {output: node for node in members for output in node.output}
        outputs = read_outside.get(position, set())
        gradients = [f"{name}_grad" for name in sorted(outputs) if f"{name}_grad" in available]
        stashed = {  # internal tensors the backward pass reads
            name
            for node in nodes
            if _is_gradient(node)
            for name in node.input
            if name in produced and name not in outputs
        }
        if not stashed or not gradients:
            continue
        needed, stack = set(), list(stashed)
        while stack:  # the layer's nodes the stashed tensors depend on
            node = produced[stack.pop()]
            if id(node) not in needed:
                needed.add(id(node))
                stack.extend(name for name in node.input if name in produced)
        clones, gates = [], {}
        for node in members:
            if id(node) not in needed:
                continue
            inputs = []
            for name in node.input:
                if name in produced:
                    inputs.append(name + RECOMPUTE)
                elif name and name not in dequantized and name in producers and not _is_gradient(producers[name]):
                    gated = f"{name}/gate{position}"
                    if gated not in gates:
                        gates[gated] = _gated(name, gradients[0], gated)
                    inputs.append(gated)
                else:
                    inputs.append(name)  # a weight, a constant, a graph input
            clone = onnx.NodeProto()
            clone.CopyFrom(node)
            del clone.input[:], clone.output[:]
            clone.input.extend(inputs)
            clone.output.extend(name + RECOMPUTE if name else name for name in node.output)
            clone.name = node.name + RECOMPUTE
            clones.append(clone)
        readers = [node for node in nodes if _is_gradient(node) and any(n in stashed for n in node.input)]
        for node in readers:
            for slot, name in enumerate(node.input):
                if name in stashed:
                    node.input[slot] = name + RECOMPUTE
        first = min(readers, key=lambda node: order[id(node)])
        before.setdefault(id(first), []).extend([*(n for nodes in gates.values() for n in nodes), *clones])
        done += 1
    if done:
        _replace_nodes(graph, [new for node in nodes for new in [*before.get(id(node), []), node]])
        _with_gate_constants(graph)
    return done
