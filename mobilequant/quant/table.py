"""The quantization table: every quantized tensor with its parameters, by stable layer name.

One :class:`QuantEntry` per tensor: ``name`` is the layer (``node.meta["mq_name"]``) the tensor belongs to
and ``role`` says how (``output`` of the layer, ``weight`` / ``bias`` of a conv / linear, ``input`` for
graph inputs and for a consumer-specific requantization). The output of a fused conv+ReLU6 is listed under
the conv's name, because the pair is one int8 op. Parameters are read from the quantize / dequantize nodes
of a converted PT2E graph (folded or not), so the table describes exactly what was simulated and exported.

``to_json`` / ``from_json`` round-trip exactly (floats are written with ``repr``); ``sha256`` hashes a
canonical JSON (sorted keys, no whitespace); ``diff`` lists differences in one line each.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch.fx import GraphModule, Node

from ..capture import layer_name
from ..errors import InputError

__all__ = ["QuantEntry", "QuantTable", "ROLES"]

ROLES = ("input", "output", "weight", "bias")
TABLE_VERSION = 1

_qd = torch.ops.quantized_decomposed
_QUANTIZE = {
    _qd.quantize_per_tensor.default,
    _qd.quantize_per_tensor.tensor,
    _qd.quantize_per_channel.default,
}
_DEQUANTIZE = {
    _qd.dequantize_per_tensor.default,
    _qd.dequantize_per_tensor.tensor,
    _qd.dequantize_per_channel.default,
}
_WEIGHTED_ROLES = {1: "weight", 2: "bias"}
_ROLE_ORDER = {"input": 0, "weight": 1, "bias": 2, "output": 3}


@dataclass(frozen=True)
class QuantEntry:
    name: str
    role: str
    dtype: str  # "int8" | "int32" | ...
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int | None  # channel axis for per-channel parameters, None for per-tensor
    qmin: int
    qmax: int

    @property
    def key(self) -> str:
        return f"{self.name}:{self.role}"

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scale"], d["zero_point"] = list(self.scale), list(self.zero_point)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QuantEntry:
        return cls(
            name=str(d["name"]),
            role=str(d["role"]),
            dtype=str(d["dtype"]),
            scale=tuple(float(s) for s in d["scale"]),
            zero_point=tuple(int(z) for z in d["zero_point"]),
            axis=None if d["axis"] is None else int(d["axis"]),
            qmin=int(d["qmin"]),
            qmax=int(d["qmax"]),
        )

    def _same_params(self, other: QuantEntry) -> bool:
        return (self.dtype, self.scale, self.zero_point, self.axis, self.qmin, self.qmax) == (
            other.dtype, other.scale, other.zero_point, other.axis, other.qmin, other.qmax
        )


class QuantTable:
    """Ordered, immutable collection of :class:`QuantEntry` (graph order), unique by ``name:role``."""

    def __init__(self, entries: tuple[QuantEntry, ...] | list[QuantEntry] = ()):
        self._entries = tuple(entries)
        self._by_key = {e.key: e for e in self._entries}
        if len(self._by_key) != len(self._entries):
            raise ValueError("duplicate entries in quantization table")

    # -------------------------------------------------------------------------------------- access
    def __iter__(self) -> Iterator[QuantEntry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other) -> bool:
        return isinstance(other, QuantTable) and self._entries == other._entries

    def __repr__(self) -> str:
        return f"QuantTable({len(self)} entries, sha256={self.sha256()[:12]})"

    def get(self, name: str, role: str = "output") -> QuantEntry | None:
        return self._by_key.get(f"{name}:{role}")

    @property
    def entries(self) -> tuple[QuantEntry, ...]:
        return self._entries

    # ------------------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        return {"version": TABLE_VERSION, "entries": [e.to_dict() for e in self._entries]}

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> QuantTable:
        try:
            d = json.loads(text)
            if d.get("version") != TABLE_VERSION:
                raise ValueError(f"unsupported table version {d.get('version')!r}")
            return cls(QuantEntry.from_dict(e) for e in d["entries"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"not a mobilequant quantization table: {e}") from None

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()

    # ---------------------------------------------------------------------------------- comparison
    def diff(self, other: QuantTable, rtol: float = 1e-6) -> list[str]:
        """Differences as one line each; empty when the tables agree (scales within ``rtol``)."""
        out = []
        for e in self._entries:
            o = other._by_key.get(e.key)
            if o is None:
                out.append(f"{e.key}: only in the first table")
                continue
            for attr in ("dtype", "axis", "qmin", "qmax"):
                if getattr(e, attr) != getattr(o, attr):
                    out.append(f"{e.key}: {attr} {getattr(e, attr)!r} vs {getattr(o, attr)!r}")
            if len(e.scale) != len(o.scale):
                out.append(f"{e.key}: {len(e.scale)} scales vs {len(o.scale)}")
                continue
            worst, where = 0.0, 0
            for i, (a, b) in enumerate(zip(e.scale, o.scale)):
                rel = abs(a - b) / max(abs(a), abs(b), 1e-45)
                if rel > worst:
                    worst, where = rel, i
            if worst > rtol:
                out.append(f"{e.key}: scale[{where}] {e.scale[where]!r} vs {o.scale[where]!r} (rel {worst:.2e})")
            if e.zero_point != o.zero_point:
                i = next(i for i, (a, b) in enumerate(zip(e.zero_point, o.zero_point)) if a != b)
                out.append(f"{e.key}: zero_point[{i}] {e.zero_point[i]} vs {o.zero_point[i]}")
        for o in other._entries:
            if o.key not in self._by_key:
                out.append(f"{o.key}: only in the second table")
        return out

    # ----------------------------------------------------------------------------------- extraction
    @classmethod
    def from_graph(cls, gm: GraphModule) -> QuantTable:
        """Read every quantized tensor from a ``convert_pt2e`` graph (``fold_quantize`` either way)."""
        position = {n: i for i, n in enumerate(gm.graph.nodes)}
        entries: dict[str, QuantEntry] = {}
        anchor: dict[str, int] = {}  # graph position of the layer an entry belongs to
        for dq in gm.graph.nodes:
            if dq.op != "call_function" or dq.target not in _DEQUANTIZE:
                continue
            q = dq.args[0]
            source = q.args[0] if isinstance(q, Node) and q.target in _QUANTIZE else q
            params = _params(gm, dq)
            for name, role, node in _names(source, dq):
                entry = QuantEntry(name, role, *params)
                old = entries.get(entry.key)
                if old is None:
                    entries[entry.key] = entry
                    anchor[entry.key] = position[node] if node in position else -1
                elif not old._same_params(entry) and role == "output":
                    # the same tensor requantized for one consumer: list it as that consumer's input
                    for user in dq.users:
                        alt = QuantEntry(layer_name(user), "input", *params)
                        if alt.key not in entries:
                            entries[alt.key], anchor[alt.key] = alt, position[user]
        # Layer by layer (graph order), and within a layer: input, weight, bias, output.
        ordered = sorted(entries.values(), key=lambda e: (anchor[e.key], _ROLE_ORDER[e.role]))
        return cls(tuple(ordered))


def _names(source, dq: Node) -> list[tuple[str, str, Node]]:
    """(layer name, role, node that places it in the graph) of the tensor ``dq`` dequantizes."""
    if not isinstance(source, Node):
        return []
    if source.op == "placeholder":
        return [(str(source.target), "input", source)]
    if source.op == "get_attr":  # a constant: named after the layer that consumes it
        out = []
        for user in dq.users:
            role = "input"
            for i, a in enumerate(user.args):
                if a is dq:
                    role = _WEIGHTED_ROLES.get(i, "input") if _is_weighted(user) else "input"
            out.append((layer_name(user), role, user))
        return out
    return [(source.meta.get("mq_fused_into") or layer_name(source), "output", source)]


def _is_weighted(node: Node) -> bool:
    from .quantizer import OP_RULES, Rule

    return OP_RULES.get(node.target) is Rule.WEIGHTED


def _attr(gm: GraphModule, node) -> torch.Tensor:
    if isinstance(node, Node):
        obj = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj
    return torch.as_tensor(node)


def _params(gm: GraphModule, dq: Node) -> tuple:
    per_channel = dq.target == _qd.dequantize_per_channel.default
    args = list(dq.args)
    if per_channel:
        _, scale, zp, axis, qmin, qmax, dtype = args[:7]
    else:
        _, scale, zp, qmin, qmax, dtype = args[:6]
        axis = None
    scale_t = _attr(gm, scale).reshape(-1).to(torch.float32)
    zp_t = _attr(gm, zp).reshape(-1)
    scales = tuple(float(s) for s in scale_t.tolist())
    if not all(math.isfinite(s) for s in scales):
        raise ValueError("non-finite scale in converted graph")
    return (
        str(dtype).replace("torch.", ""),
        scales,
        tuple(int(z) for z in zp_t.tolist()),
        None if axis is None else int(axis),
        int(qmin),
        int(qmax),
    )
