"""Graph rewrites made before lowering to TFLite, where the runtime lacks an op or a layout.

Each rewrite works on a copy of the graph that is about to be lowered (the quantized ``export_graph`` or a
float graph), changes no value the torch simulation computes, and is reported as a :class:`Rewrite`
(listed in the artifact's census):

* ``hardsigmoid`` (int8 only): TFLite has no HARD_SIGMOID kernel and litert-torch lowers
  ``aten.hardsigmoid`` to float ``ADD(+3, RELU6) → MUL(1/6)`` between DEQUANTIZE/QUANTIZE. The rewrite
  spells that out with int8 tensors: ``dq(x) → add(3) → clamp(0, 6) → q(6·s, z) → dq → mul(1/6) → q(s, z)``
  with ``(s, z)`` the hardsigmoid's output parameters. The middle scale is exactly 6·s, so the MUL maps
  each middle level onto one output level and the result equals ``q(hardsigmoid(x))``.
* ``flatten_linear``: a classifier that flattens an N×C×H×W map (H·W > 1) reads it in NCHW order, which
  costs a TRANSPOSE in NHWC; flattening in NHWC order with the weight's columns permuted to match gives
  the same products.
* ``channel_shuffle``: ``reshape(N,g,C/g,H,W) → transpose(1,2) → reshape(N,C,H,W)`` lowers to three
  TRANSPOSEs in NHWC; written as ``permute(0,2,3,1) → reshape(N,H,W,g,C/g) → transpose(3,4) →
  reshape(N,H,W,C) → permute(0,3,1,2)`` it lowers to one TRANSPOSE (the outer permutes cancel against the
  layout transposes). In a quantized graph every new tensor gets the shuffle's (shared) parameters.
* ``spatial_mean``: ``x.mean((2, 3))`` (global pooling to N×C, a common classifier head) lowers to a
  TRANSPOSE back to NCHW before the MEAN; ``mean((2, 3), keepdim=True) → flatten`` lowers to an NHWC
  MEAN and a RESHAPE (in a quantized graph the flatten keeps the mean's parameters). When ``x`` is
  ``permute(y, (0, 3, 1, 2))`` (the end of an NHWC-written channel shuffle) it becomes ``y.mean((1, 2))``.
* ``channel_clamp``: CLE's exact ReLU6, ``clamp.Tensor(x, lo, hi)`` with per-channel ``[C,1,1]`` bounds,
  lowers to MINIMUM / MAXIMUM whose NCHW-shaped constants keep the op in NCHW: a TRANSPOSE pair around
  every clamp. Written as ``permute(0,2,3,1) → clamp with [C] bounds → permute(0,3,1,2)`` the
  permutes cancel against the layout transposes. In a quantized graph the permuted input keeps the
  input's parameters and the permuted output the clamp's (MINIMUM / MAXIMUM and TRANSPOSE keep their
  input's parameters in TFLite).
* ``pad``: a constant (zero) pad of an N×C×H×W tensor (``F.pad(x, (l, r, t, b))``, ``nn.ZeroPad2d``) has
  no NHWC form in litert-torch's layout pass and stays in NCHW between two TRANSPOSEs; written as
  ``permute(0,2,3,1) → pad (0, 0, l, r, t, b) → permute(0,3,1,2)`` the permutes cancel against the layout
  transposes. A replicate pad wider than 1 (litert-torch lowers only widths ≤ 1 to TFLite's MIRROR_PAD,
  wider ones to GATHER_NDs in NCHW between TRANSPOSEs) becomes replicate pads of width 1 in a row: each
  repeats the current edge once, so ``k`` of them repeat the original edge ``k`` times, as one pad of
  width ``k`` does. In a quantized graph every new tensor keeps the pad's (shared) parameters.
* ``group_norm`` (float; in an int8 file only under ``float_fallback``): litert-torch computes
  ``nn.GroupNorm`` in NCHW between two TRANSPOSEs. Written on the channels-last tensor —
  ``permute(0,2,3,1) → reshape(N, H·W, G, C/G)``, mean and (biased) variance over dims 1 and 3, normalise,
  ``reshape(N, H, W, C)``, per-channel scale and shift on the last dim, ``permute(0,3,1,2)`` — it is the
  same arithmetic in NHWC order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.ao.quantization.fx._decomposed import quantized_decomposed_lib  # noqa: F401 (registers the q/dq ops)
from torch.fx import GraphModule, Node

from ..capture import layer_name

__all__ = ["Rewrite", "rewrite_for_tflite", "INTERNAL_KEY"]

INTERNAL_KEY = "mq_rewrite_internal"  # node.meta flag: a tensor that only exists because of a rewrite

aten = torch.ops.aten
_qd = torch.ops.quantized_decomposed
_Q = (_qd.quantize_per_tensor.default,)
_DQ = (_qd.dequantize_per_tensor.default,)
_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
_IDENTITIES = (aten.dropout.default, aten.clone.default, aten.alias.default, aten.contiguous.default)
_PADS = (aten.pad.default, aten.constant_pad_nd.default)
_META_KEYS = ("nn_module_stack", "stack_trace", "mq_name", "source_fn_stack", "from_node")


@dataclass(frozen=True)
class Rewrite:
    kind: str  # "hardsigmoid" | "channel_shuffle" | "flatten_linear" | "channel_clamp" | "spatial_mean" | "pad"
    #           | "group_norm"
    layer: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} at {self.layer}: {self.detail}"


def rewrite_for_tflite(gm: GraphModule, quantized: bool) -> list[Rewrite]:
    """Apply the TFLite rewrites to ``gm`` in place; return what was rewritten."""
    done = []
    if quantized:
        done += _rewrite_hardsigmoid(gm)
    done += _rewrite_channel_shuffle(gm, quantized)
    done += _rewrite_flatten_linear(gm, quantized)
    done += _rewrite_channel_clamp(gm, quantized)
    done += _rewrite_spatial_mean(gm, quantized)
    done += _rewrite_pad(gm, quantized)
    done += _rewrite_group_norm(gm)
    if done:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return done


# --------------------------------------------------------------------------------------------- helpers
def _copy_meta(new: Node, old: Node) -> None:
    for key in _META_KEYS:
        if key in old.meta:
            new.meta[key] = old.meta[key]


def _const(gm: GraphModule, stem: str, value: torch.Tensor) -> Node:
    k = 0
    while hasattr(gm, f"{stem}_{k}"):
        k += 1
    gm.register_buffer(f"{stem}_{k}", value)
    return gm.graph.get_attr(f"{stem}_{k}")


def _qdq(gm: GraphModule, x: Node, scale: float, zp: int, qmin: int, qmax: int, dtype, like: Node) -> Node:
    q = gm.graph.call_function(_qd.quantize_per_tensor.default, (x, scale, zp, qmin, qmax, dtype))
    dq = gm.graph.call_function(_qd.dequantize_per_tensor.default, (q, scale, zp, qmin, qmax, dtype))
    _copy_meta(q, like)
    _copy_meta(dq, like)
    return dq


def _quantized_const(gm: GraphModule, stem: str, value: float, like: Node) -> Node:
    """``dq(q(c))`` for a scalar constant, int8 symmetric (scale |c|/127), as a broadcastable 4-D tensor."""
    scale = abs(value) / 127.0
    c = _const(gm, stem, torch.full((1, 1, 1, 1), value, dtype=torch.float32))
    return _qdq(gm, c, scale, 0, -127, 127, torch.int8, like)


def _attr_value(gm: GraphModule, node) -> torch.Tensor | None:
    if not isinstance(node, Node) or node.op != "get_attr":
        return None
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj.detach() if isinstance(obj, torch.Tensor) else None


def _single_user(node: Node) -> Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _through_qdq(node: Node) -> tuple[Node, tuple | None]:
    """Follow ``node → q → dq`` (its only user chain) to the dq; returns (last node, q args or None)."""
    q = _single_user(node)
    if q is not None and q.target in _Q:
        dq = _single_user(q)
        if dq is not None and dq.target in _DQ:
            return dq, tuple(q.args[1:])
    return node, None


def _user_past_identities(node: Node) -> tuple[Node, Node | None]:
    """``(last, user)``: the only consumer of ``node``'s value through ``q → dq`` pairs and identities
    (dropout, clone, contiguous, alias) that each have one user, and the node it reads (``user`` is
    ``None`` when the value branches)."""
    last, _ = _through_qdq(node)
    user = _single_user(last)
    while user is not None and user.op == "call_function" and user.target in _IDENTITIES:
        last, _ = _through_qdq(user)
        user = _single_user(last)
    return last, user


def _shape(node) -> tuple[int, ...] | None:
    """Static shape from ``meta["val"]`` (-1 for symbolic sizes); quantize / dequantize keep their input's."""
    if not isinstance(node, Node):
        return None
    val = node.meta.get("val")
    if val is None and node.op == "call_function" and node.target in (*_Q, *_DQ):
        return _shape(node.args[0])
    if val is None or not hasattr(val, "shape"):
        return None
    try:
        return tuple(int(s) if not isinstance(s, torch.SymInt) else -1 for s in val.shape)
    except TypeError:
        return None


# ------------------------------------------------------------------------------------- hardsigmoid
def _rewrite_hardsigmoid(gm: GraphModule) -> list[Rewrite]:
    done = []
    for h in list(gm.graph.nodes):
        if h.op != "call_function" or h.target not in (aten.hardsigmoid.default, aten.hardsigmoid_.default):
            continue
        x = h.args[0]
        q = _single_user(h)
        if not (isinstance(x, Node) and x.target in _DQ and q is not None and q.target in _Q):
            continue  # not quantized around: leave it
        scale, zp, qmin, qmax, dtype = q.args[1:6]
        with gm.graph.inserting_before(h):
            three = _quantized_const(gm, "_mq_hardsigmoid_three", 3.0, h)
            added = gm.graph.call_function(aten.add.Tensor, (x, three))
            clamped = gm.graph.call_function(aten.hardtanh.default, (added, 0.0, 6.0))
            middle = _qdq(gm, clamped, 6.0 * float(scale), int(zp), int(qmin), int(qmax), dtype, h)
            sixth = _quantized_const(gm, "_mq_hardsigmoid_sixth", 1.0 / 6.0, h)
            out = gm.graph.call_function(aten.mul.Tensor, (middle, sixth))
        for n in (added, clamped, out):
            _copy_meta(n, h)
        added.meta[INTERNAL_KEY] = clamped.meta[INTERNAL_KEY] = True
        h.replace_all_uses_with(out)
        gm.graph.erase_node(h)
        done.append(Rewrite("hardsigmoid", layer_name(h) if "mq_name" in h.meta else h.name,
                            f"int8 ADD(+3, RELU6) with scale 6×{float(scale):.6g} → MUL(1/6)"))
    return done


# --------------------------------------------------------------------------------- channel shuffle
def _is_permute_12(node: Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target == aten.transpose.int:
        dims = sorted(int(d) % 5 for d in node.args[1:3])
        return dims == [1, 2]
    if node.target == aten.permute.default:
        return [int(d) % 5 for d in node.args[1]] == [0, 2, 1, 3, 4]
    return False


def _rewrite_channel_shuffle(gm: GraphModule, quantized: bool) -> list[Rewrite]:
    done = []
    for r1 in list(gm.graph.nodes):
        if r1.op != "call_function" or r1.target not in _RESHAPES:
            continue
        x = r1.args[0]
        in_shape, mid_shape = _shape(x), _shape(r1)
        if in_shape is None or mid_shape is None or len(in_shape) != 4 or len(mid_shape) != 5:
            continue
        _, c, h, w = in_shape
        _, g, cg, h2, w2 = mid_shape
        if (h2, w2) != (h, w) or g * cg != c or g < 2:
            continue
        a, qargs = _through_qdq(r1)
        t = _single_user(a)
        if t is None or not _is_permute_12(t):
            continue
        _, r3 = _user_past_identities(t)  # `.contiguous()` before the last view (torchvision's channel_shuffle)
        if r3 is None or r3.target not in _RESHAPES or _shape(r3) is None or _shape(r3)[1:] != (c, h, w):
            continue
        if quantized and qargs is None:
            continue

        def op(target, *args) -> Node:
            node = gm.graph.call_function(target, args)
            _copy_meta(node, r1)
            return node

        def wrap(node: Node) -> Node:
            return _qdq(gm, node, *qargs, like=r1) if quantized else node

        with gm.graph.inserting_before(r3):
            p1 = wrap(op(aten.permute.default, x, [0, 2, 3, 1]))
            r = wrap(op(aten.reshape.default, p1, [-1, h, w, g, cg]))
            tt = wrap(op(aten.permute.default, r, [0, 1, 2, 4, 3]))
            r2 = wrap(op(aten.reshape.default, tt, [-1, h, w, c]))
            p2 = op(aten.permute.default, r2, [0, 3, 1, 2])
        for n in (p1, r, tt, r2):
            (n.args[0].args[0] if quantized else n).meta[INTERNAL_KEY] = True
        r3.replace_all_uses_with(p2)
        done.append(Rewrite("channel_shuffle", layer_name(r1) if "mq_name" in r1.meta else r1.name,
                            f"groups={g}, written in NHWC (one TRANSPOSE)"))
    return done



# ------------------------------------------------------------------------------ flatten → linear
def _is_flatten(node: Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target == aten.flatten.using_ints:
        start = node.args[1] if len(node.args) > 1 else 0
        end = node.args[2] if len(node.args) > 2 else -1
        return start == 1 and end in (-1, 3)
    if node.target in _RESHAPES:
        shape = _shape(node)
        return shape is not None and len(shape) == 2
    return False


def _weight_attr(w: Node) -> Node | None:
    """The ``get_attr`` holding a linear weight, through ``dq(q(·))`` in a quantized graph."""
    if w.op == "get_attr":
        return w
    if w.op == "call_function" and w.target in (_qd.dequantize_per_channel.default, *_DQ):
        q = w.args[0]
        if isinstance(q, Node) and q.op == "call_function" and isinstance(q.args[0], Node):
            return q.args[0] if q.args[0].op == "get_attr" else None
    return None


def _rewrite_flatten_linear(gm: GraphModule, quantized: bool) -> list[Rewrite]:
    """``flatten(N,C,H,W) → linear`` with H·W > 1 becomes ``permute(0,2,3,1) → flatten → linear`` with the
    weight's input columns permuted to (H, W, C) order: same products, no TRANSPOSE in NHWC. Per-output
    channel weight scales are unchanged (a column permutation keeps each row's range)."""
    done = []
    for f in list(gm.graph.nodes):
        if not _is_flatten(f):
            continue
        x = f.args[0]
        shape = _shape(x)
        if shape is None or len(shape) != 4 or shape[2] * shape[3] == 1 or min(shape[1:]) < 1:
            continue
        _, c, h, w = shape
        _, qargs = _through_qdq(f)
        after, lin = _user_past_identities(f)  # eval-mode dropout / clone between flatten and linear
        if lin is None or lin.target != aten.linear.default or lin.args[0] is not after:
            continue
        if quantized and qargs is None:
            continue
        attr = _weight_attr(lin.args[1])
        if attr is None or len(attr.users) != 1:
            continue
        weight = _attr_value(gm, attr)
        if weight is None or weight.ndim != 2 or weight.shape[1] != c * h * w:
            continue
        permuted = weight.reshape(weight.shape[0], c, h, w).permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
        with gm.graph.inserting_before(attr):
            new_attr = _const(gm, "_mq_linear_weight_nhwc", permuted.contiguous().clone())
        _copy_meta(new_attr, attr)
        attr.replace_all_uses_with(new_attr)
        with gm.graph.inserting_before(f):
            p = gm.graph.call_function(aten.permute.default, (x, [0, 2, 3, 1]))
            _copy_meta(p, f)
            p.meta[INTERNAL_KEY] = True
            src = _qdq(gm, p, *qargs, like=f) if quantized else p
        f.replace_input_with(x, src)
        if f.target == aten.flatten.using_ints:
            f.args = (src, 1, -1)
        elif f.target != aten.reshape.default:  # x.view(N, -1): a view of the permuted tensor does not exist
            f.target = aten.reshape.default
        f.meta[INTERNAL_KEY] = True  # its vector is now in (H, W, C) order: not the model's flatten output
        done.append(Rewrite("flatten_linear", layer_name(lin) if "mq_name" in lin.meta else lin.name,
                            f"flatten of {c}×{h}×{w} in NHWC order, weight columns permuted (no TRANSPOSE)"))
    return done


# ------------------------------------------------------------------------------ per-channel clamp
def _rewrite_channel_clamp(gm: GraphModule, quantized: bool) -> list[Rewrite]:
    done = []
    for cl in list(gm.graph.nodes):
        if cl.op != "call_function" or cl.target != aten.clamp.Tensor or len(cl.args) != 3:
            continue
        x, lo, hi = cl.args
        shape = _shape(x)
        bounds = [_attr_value(gm, b) for b in (lo, hi)]
        if shape is None or len(shape) != 4 or any(
                b is None or tuple(b.shape) not in ((shape[1], 1, 1), (1, shape[1], 1, 1)) for b in bounds):
            continue
        x_q = tuple(x.args[1:]) if quantized and x.target in _DQ else None
        out, out_q = _through_qdq(cl)
        if quantized and (x_q is None or out_q is None):
            continue
        with gm.graph.inserting_before(cl):
            p1 = gm.graph.call_function(aten.permute.default, (x, [0, 2, 3, 1]))
            src = _qdq(gm, p1, *x_q, like=cl) if quantized else p1
            nhwc = [_const(gm, "_mq_clamp_bound_nhwc", b.reshape(-1).clone()) for b in bounds]  # broadcasts over C
            c = gm.graph.call_function(aten.clamp.Tensor, (src, *nhwc))
            c_out = _qdq(gm, c, *out_q, like=cl) if quantized else c
            p2 = gm.graph.call_function(aten.permute.default, (c_out, [0, 3, 1, 2]))
            result = _qdq(gm, p2, *out_q, like=cl) if quantized else p2
        for n in (p1, c, p2):
            _copy_meta(n, cl)
        for n in (p1, p2):  # layout-only tensors: the layer's output is the clamp's
            n.meta[INTERNAL_KEY] = True
        if "mq_fused_into" in cl.meta:
            c.meta["mq_fused_into"] = cl.meta["mq_fused_into"]
        out.replace_all_uses_with(result)
        done.append(Rewrite("channel_clamp", cl.meta.get("mq_fused_into") or (
            layer_name(cl) if "mq_name" in cl.meta else cl.name), "per-channel clamp computed in NHWC"))
    return done


# ------------------------------------------------------------------------------------ spatial mean
def _channels_last_source(x) -> Node | None:
    """``y`` when ``x`` is ``permute(y, (0, 3, 1, 2))`` — the NCHW view of a channels-last tensor — directly or
    through a ``q → dq`` pair with ``y``'s own parameters (a permute keeps them); else ``None``."""
    if isinstance(x, Node) and x.op == "call_function" and x.target in _DQ:
        q = x.args[0]
        if not (isinstance(q, Node) and q.target in _Q and tuple(q.args[1:]) == tuple(x.args[1:])):
            return None
        x = q.args[0]
        y = _channels_last_source(x)
        same = y is not None and y.target in _DQ and tuple(y.args[1:]) == tuple(q.args[1:])
        return y if same else None
    if (isinstance(x, Node) and x.op == "call_function" and x.target == aten.permute.default
            and [int(d) for d in x.args[1]] == [0, 3, 1, 2]):
        return x.args[0]
    return None


def _rewrite_spatial_mean(gm: GraphModule, quantized: bool) -> list[Rewrite]:
    done = []
    for m in list(gm.graph.nodes):
        if m.op != "call_function" or m.target != aten.mean.dim or len(m.args) < 2:
            continue
        keepdim = bool(m.args[2] if len(m.args) > 2 else m.kwargs.get("keepdim", False))
        shape = _shape(m)  # its own N×C (×1×1): an earlier rewrite may have left its input without a shape
        if (shape is None or len(shape) != (4 if keepdim else 2) or (keepdim and shape[2:] != (1, 1))
                or sorted(int(d) % 4 for d in m.args[1]) != [2, 3]):
            continue
        y = _channels_last_source(m.args[0])
        out, qargs = _through_qdq(m)
        if (y is None and keepdim) or (quantized and qargs is None):
            continue
        name = layer_name(m) if "mq_name" in m.meta else m.name
        if y is not None and not keepdim:
            m.args, m.kwargs = (y, [1, 2], False), {}
            done.append(Rewrite("spatial_mean", name, "mean over H, W of the channels-last tensor before the "
                                                      "permute (no TRANSPOSE)"))
            continue
        # keepdim=False: mean kept 4-D (NHWC MEAN), then flattened to N×C; keepdim=True over the channels-last
        # tensor: N×1×1×C, then reshaped to N×C×1×1 (the same order of values at 1×1)
        src, dims = (y, [1, 2]) if y is not None else (m.args[0], [2, 3])
        m.args, m.kwargs = (src, dims, True), {}
        users = list(out.users)
        with gm.graph.inserting_before(out.next):
            r = (gm.graph.call_function(aten.reshape.default, (out, [-1, shape[1], 1, 1])) if keepdim
                 else gm.graph.call_function(aten.flatten.using_ints, (out, 1, -1)))
            result = _qdq(gm, r, *qargs, like=m) if quantized else r
        _copy_meta(r, m)
        r.meta[INTERNAL_KEY] = True  # the mean's value again, in its own shape: not a layer of its own
        for u in users:
            u.replace_input_with(out, result)
        done.append(Rewrite("spatial_mean", name, f"mean over H, W of {'the channels-last tensor' if y is not None else 'x'}"
                                                  " kept 4-D, then reshaped (no TRANSPOSE)"))
    return done


# ------------------------------------------------------------------------------------------------ pad
def _pad_form(node: Node) -> tuple[str, list[int], float] | None:
    """``(mode, [l, r(, t, b)], value)`` of a pad over the last one or two dims of a 4-D tensor, else None."""
    if node.target == aten.constant_pad_nd.default:
        mode, value = "constant", node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0.0)
    else:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    pads = node.args[1]
    shape = _shape(node.args[0])
    if shape is None or len(shape) != 4 or len(pads) not in (2, 4) or not all(isinstance(v, int) for v in pads):
        return None
    return str(mode), [int(v) for v in pads], float(value or 0.0)


def _rewrite_pad(gm: GraphModule, quantized: bool) -> list[Rewrite]:
    done = []
    for pad in list(gm.graph.nodes):
        if pad.op != "call_function" or pad.target not in _PADS:
            continue
        form = _pad_form(pad)
        if form is None:
            continue
        mode, pads, value = form
        x = pad.args[0]
        x_q = tuple(x.args[1:]) if quantized and x.target in _DQ else None
        out, out_q = _through_qdq(pad)
        if quantized and (x_q is None or out_q is None):
            continue
        name = layer_name(pad) if "mq_name" in pad.meta else pad.name

        def op(target, *args) -> Node:
            node = gm.graph.call_function(target, args)
            _copy_meta(node, pad)
            return node

        def wrap(node: Node, qargs) -> Node:
            return _qdq(gm, node, *qargs, like=pad) if quantized else node

        if mode == "constant":
            l, r, t, b = (*pads, 0, 0) if len(pads) == 2 else pads
            with gm.graph.inserting_before(pad):
                p1 = op(aten.permute.default, x, [0, 2, 3, 1])
                padded = op(aten.constant_pad_nd.default, wrap(p1, x_q), [0, 0, l, r, t, b], value)
                p2 = op(aten.permute.default, wrap(padded, out_q), [0, 3, 1, 2])
                result = wrap(p2, out_q)
            for n in (p1, p2):  # layout-only tensors: the layer's output is the pad's
                n.meta[INTERNAL_KEY] = True
            detail = "constant pad computed in NHWC (no TRANSPOSE)"
        elif mode == "replicate" and max(pads) > 1 and min(pads) >= 0:
            left, steps = list(pads), []
            with gm.graph.inserting_before(pad):
                result = x
                while any(left):
                    step = [min(v, 1) for v in left]
                    left = [v - s for v, s in zip(left, step)]
                    steps.append(op(aten.pad.default, result, step, "replicate"))
                    result = wrap(steps[-1], out_q)
            for n in steps[:-1]:  # the last one is the layer's output
                n.meta[INTERNAL_KEY] = True
            detail = f"replicate pad of width {max(pads)} as {len(steps)} pads of width 1 (MIRROR_PAD, no TRANSPOSE)"
        else:
            continue
        out.replace_all_uses_with(result)
        done.append(Rewrite("pad", name, detail))
    return done


# ----------------------------------------------------------------------------------------- group norm
def _rewrite_group_norm(gm: GraphModule) -> list[Rewrite]:
    done = []
    for gn in list(gm.graph.nodes):
        if gn.op != "call_function" or gn.target != aten.group_norm.default:
            continue
        x, groups = gn.args[0], int(gn.args[1])
        weight = gn.args[2] if len(gn.args) > 2 else gn.kwargs.get("weight")
        bias = gn.args[3] if len(gn.args) > 3 else gn.kwargs.get("bias")
        eps = float(gn.args[4] if len(gn.args) > 4 else gn.kwargs.get("eps", 1e-5))
        shape = _shape(x)
        if shape is None or len(shape) != 4 or min(shape[1:]) < 1:
            continue
        _, c, h, w = shape
        made = []

        def op(target, *args) -> Node:
            made.append(gm.graph.call_function(target, args))
            _copy_meta(made[-1], gn)
            return made[-1]

        with gm.graph.inserting_before(gn):
            t = op(aten.reshape.default, op(aten.permute.default, x, [0, 2, 3, 1]), [-1, h * w, groups, c // groups])
            centred = op(aten.sub.Tensor, t, op(aten.mean.dim, t, [1, 3], True))
            var = op(aten.mean.dim, op(aten.mul.Tensor, centred, centred), [1, 3], True)
            y = op(aten.mul.Tensor, centred, op(aten.rsqrt.default, op(aten.add.Tensor, var, eps)))
            y = op(aten.reshape.default, y, [-1, h, w, c])
            if isinstance(weight, Node):  # [C]: broadcasts over the channels-last dim
                y = op(aten.mul.Tensor, y, weight)
            if isinstance(bias, Node):
                y = op(aten.add.Tensor, y, bias)
            result = op(aten.permute.default, y, [0, 3, 1, 2])
        for n in made:  # the layer's output is the last value before the layout permute
            if n is not y:
                n.meta[INTERNAL_KEY] = True
        gn.replace_all_uses_with(result)
        gm.graph.erase_node(gn)
        done.append(Rewrite("group_norm", layer_name(gn) if "mq_name" in gn.meta else gn.name,
                            f"{groups} groups computed on the channels-last tensor (no TRANSPOSE)"))
    return done
