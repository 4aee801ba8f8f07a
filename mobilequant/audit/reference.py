"""The float reference: every fused layer's output of the torch model on a batch, by stable name.

Like onnxruntime's ``augment_graph`` for ONNX, the float graph is *augmented*: a copy of the captured
(unfused, float) graph whose output is the model output plus the output node of every fused group
(post BN and activation, see :mod:`mobilequant.audit.layers`). The copy runs as compiled fx code —
several times faster than a node-by-node ``torch.fx.Interpreter``. Each returned value is a clone taken
right after its node, so a later in-place op (``hardswish_`` on a BN output) cannot change it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch.fx import Graph, GraphModule

from .layers import FusedLayer

__all__ = ["FloatReference"]

def _augmented(gm: GraphModule, keep: list[str]) -> GraphModule:
    """A copy of ``gm`` returning ``(original output, *copies of the nodes named in keep)``.

    Each kept value is cloned right after the node that makes it: the graph may overwrite it later with
    an in-place op (``hardtanh_``, ``hardswish_``, ``relu_`` ... act on their input's storage).
    """
    graph = Graph()
    env: dict = {}
    kept: dict = {}
    wanted = set(keep)
    old_out = None
    for node in gm.graph.nodes:
        if node.op == "output":
            old_out = node
            continue
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            continue  # torch.export's shape guards: not needed to compute values
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node.name in wanted:
            kept[node.name] = graph.call_function(torch.ops.aten.clone.default, (env[node],))
    result = old_out.args[0]
    first = result[0] if isinstance(result, (tuple, list)) else result
    graph.output((env[first], *[kept[n] for n in keep]))
    out = GraphModule(gm, graph)
    out.eval()
    return out


def _nodes(gm: GraphModule, names: list[str]):
    by_name = {n.name: n for n in gm.graph.nodes}
    return [by_name[n] for n in names]


class FloatReference:
    """Runs the float graph and returns ``(output, {layer name: float32 NCHW array})``.

    ``batch``: the graph was captured with this fixed batch size (a static capture is several times
    quicker than a dynamic one); a smaller batch is padded with copies of its first image and the results
    trimmed. ``None``: the graph takes any batch.
    """

    def __init__(self, gm: GraphModule, layers: Iterable[FusedLayer], names: Iterable[str] | None = None,
                 batch: int | None = None):
        wanted = None if names is None else set(names)
        self.layers = [l for l in layers if (wanted is None or l.name in wanted) and l.is_tensor]
        self.module = _augmented(gm, [l.output_node for l in self.layers])
        self.batch = batch

    def run(self, x: torch.Tensor, num_threads: int | None = 1) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``num_threads``: torch intra-op threads for this call (restored after). One by default: a batch of
        small images gains nothing from intra-op threads, and on a shared CPU their spin-waiting made the
        reference ~10× slower in measurements (docs/audit.md)."""
        n = len(x)
        if self.batch is not None and n != self.batch:
            if n > self.batch:
                raise ValueError(f"batch of {n} for a graph captured at batch {self.batch}")
            x = torch.cat([x, x[:1].expand(self.batch - n, *x.shape[1:])])
        before = torch.get_num_threads()
        if num_threads:
            torch.set_num_threads(num_threads)
        try:
            with torch.no_grad():
                out, *values = self.module(x)
        finally:
            torch.set_num_threads(before)
        return out[:n].float().numpy(), {l.name: v[:n].float().numpy() for l, v in zip(self.layers, values)}
