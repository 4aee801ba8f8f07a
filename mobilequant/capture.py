"""Capture: ``nn.Module`` → ``torch.fx.GraphModule`` of ATen ops with stable layer names.

:func:`capture` runs ``torch.export.export(model.eval(), (x,), dynamic_shapes=...)`` with a dynamic
batch dimension and returns ``.module()``. Every ``call_function`` node then carries
``node.meta["mq_name"]``, a layer name tied to the torch module it comes from:

* an op that is the only compute op of its module gets the module path (``features.1.conv.0.0``);
* other ops get module path + op name + index within that module (``features.1.add_0``; ops of the root
  module have no prefix: ``flatten_0``);
* a second call of the same module instance gets ``@1`` (``relu@1``), as in ``nn_module_stack``;
* ``getitem`` on a multi-output op is named after it with the index (``blk.chunk_0[1]``).

The names only depend on the module tree and the order of ops inside a module, so they survive
fusion, quantization and export and are how later stages (quant table, export name map, runtime
intermediates, audit) refer to layers.

Each op then has one spelling for the stages after capture: ReLU6 as ``hardtanh(x, 0, 6)``, ``x / c`` (a
number) as ``x * (1 / c)``, h-swish / h-sigmoid written as arithmetic (``x * relu6(x + 3) / 6``) as
``aten.hardswish`` / ``aten.hardsigmoid``, every eval-mode dropout (``nn.Dropout2d``'s
``feature_dropout``, alpha dropouts) as ``aten.dropout(x, p, False)`` (an identity), and an adaptive
average pooling whose output size divides its input (other than the global 1×1) as the ``avg_pool2d``
it computes. A model must return one tensor.

:func:`find_unsupported_ops` lists every op a backend cannot handle before any work is done.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import re
from collections import defaultdict
from collections.abc import Collection

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node

from .errors import InputError

__all__ = ["MQ_NAME", "capture", "name_layers", "find_unsupported_ops", "layer_name", "op_name", "is_structural",
           "node_arg", "modes_kept", "keeps_caller_state"]

MQ_NAME = "mq_name"

# nn_module_stack keys that are not modules (export metadata hooks, e.g. for symbolic size ops).
_NOT_A_MODULE = re.compile(r"^_empty_nn_module_stack|^_guards")


@contextlib.contextmanager
def modes_kept(*modules):
    """Put ``modules`` in eval mode for the block and give every submodule its own ``training`` flag back
    after: a notebook that exports between training epochs had its model left in eval mode (its dropout
    and BN statistics off for the epochs after). ``model.train(flag)`` would not do: it sets one flag on
    all submodules, and a model with frozen BN layers inside a training model has two."""
    flags = [(m, m.training) for module in modules if isinstance(module, nn.Module) for m in module.modules()]
    try:
        for m, _ in flags:  # not module.eval(): a torch.export graph module refuses it
            m.training = False
        yield
    finally:
        for m, training in flags:
            m.training = training


def keeps_caller_state(fn):
    """Decorate a public entry point so that the caller's model modes and global torch RNG stream are as
    they were when it returns: the torch.nn.Module arguments (and a ``float_model`` an argument carries)
    run in eval mode and get their flags back (:func:`modes_kept`), and the CPU RNG is forked — export
    seeds it for reproducible files, which had reset a training loop's stream to ``seed``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        values = [*args, *kwargs.values()]
        modules = [v for v in values if isinstance(v, nn.Module)]
        modules += [getattr(v, "float_model", None) for v in values if not isinstance(v, nn.Module)]
        with torch.random.fork_rng(devices=[]), modes_kept(*[m for m in modules if isinstance(m, nn.Module)]):
            return fn(*args, **kwargs)

    return wrapper


@keeps_caller_state
def capture(model: nn.Module, example_input: torch.Tensor, dynamic_batch: bool = True) -> GraphModule:
    """Export ``model`` (in eval mode) on ``example_input`` and name every op.

    With ``dynamic_batch`` the first dimension is exported as ``Dim("batch")``. A batch of one is
    duplicated to two for the trace, because export specialises a size-1 dimension.
    Raises :class:`InputError` with one line naming the module (or op) that cannot be captured.
    """
    if not isinstance(example_input, torch.Tensor):
        raise InputError(f"example input must be a tensor, got {type(example_input).__name__}")
    x = example_input.detach()
    dynamic_shapes = None
    if dynamic_batch:
        if x.shape[0] == 1:
            x = torch.cat([x, x])
        dynamic_shapes = ({0: torch.export.Dim("batch")},)
    try:
        with torch.no_grad():
            ep = torch.export.export(model, (x,), dynamic_shapes=dynamic_shapes)
    except Exception as e:  # export raises many unrelated types; all mean "cannot capture"
        raise InputError(_capture_error_line(model, e, dynamic_batch)) from e
    outputs, spec = ep.graph_signature.user_outputs, ep.call_spec.out_spec
    if len(outputs) != 1 or (spec is not None and not spec.is_leaf()):
        raise InputError(f"{type(model).__name__} returns {len(outputs)} tensor(s) in a tuple, list or dict; "
                         "mobilequant exports and checks models with one output tensor — wrap the model so "
                         "that forward returns the one you ship, or export each head on its own")
    gm = ep.module()
    name_layers(gm)
    # one spelling per op for the stages after capture (each pass says whether it changed the graph)
    if any([_relu6_as_hardtanh(gm), _division_by_constant_as_mul(gm), _hard_activations_from_arithmetic(gm),
            _eval_dropout_as_dropout(gm), _uniform_adaptive_pool_as_avg_pool(gm)]):
        gm.recompile()
    return gm


def _relu6_as_hardtanh(gm: GraphModule) -> bool:
    """``F.relu6`` exports as ``aten.relu6`` and ``nn.ReLU6`` as ``aten.hardtanh(x, 0, 6)``: one spelling
    (hardtanh, what ``relu6`` decomposes to) so fusion, the quantizer and export see the same op."""
    changed = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.relu6.default, torch.ops.aten.relu6_.default):
            inplace = node.target == torch.ops.aten.relu6_.default
            node.target = torch.ops.aten.hardtanh_.default if inplace else torch.ops.aten.hardtanh.default
            node.args = (node.args[0], 0.0, 6.0)
            changed = True
    return changed


def _division_by_constant_as_mul(gm: GraphModule) -> bool:
    """``x / c`` for a number ``c`` as ``x * (1 / c)``: the spelling the quantizer and both runtimes take
    (TFLite's int8 DIV is not in the int8 spec's op set), and the one the h-swish pattern
    ``x * relu6(x + 3) / 6`` — how many MobileNetV3 implementations write it — is matched in."""
    aten = torch.ops.aten
    changed = False
    for node in gm.graph.nodes:
        if (node.op == "call_function" and node.target in (aten.div.Tensor, aten.div_.Tensor) and len(node.args) == 2
                and not node.kwargs and isinstance(node.args[1], (int, float)) and not isinstance(node.args[1], bool)
                and node.args[1] != 0):
            node.target = aten.mul_.Tensor if node.target == aten.div_.Tensor else aten.mul.Tensor
            node.args = (node.args[0], 1.0 / node.args[1])
            changed = True
    return changed


def _hard_activations_from_arithmetic(gm: GraphModule) -> bool:
    """h-swish and h-sigmoid written as arithmetic — ``x * relu6(x + 3) / 6``, ``x * (relu6(x + 3) / 6)``,
    ``relu6(x + 3) / 6`` — as ``aten.hardswish`` / ``aten.hardsigmoid``.

    The same values, but one op: the quantizer gives h-sigmoid its fixed output range and h-swish one
    range (not one per intermediate), and TFLite's converter fuses the arithmetic into a single
    HARD_SWISH anyway — so the int8 simulation computes what the file computes.
    """
    aten = torch.ops.aten
    muls = (aten.mul.Tensor, aten.mul_.Tensor)

    def call(node, targets) -> bool:
        return isinstance(node, Node) and node.op == "call_function" and node.target in targets

    def only_user(node):
        return next(iter(node.users)) if len(node.users) == 1 else None

    def times_sixth(node) -> bool:
        return call(node, muls) and len(node.args) == 2 and isinstance(node.args[1], float) and abs(
            node.args[1] - 1.0 / 6.0) < 1e-7

    def other(mul, operand):
        a, b = mul.args[:2]
        return b if a is operand else a if b is operand else None

    changed = False
    for r in list(gm.graph.nodes):
        if not (call(r, (aten.hardtanh.default, aten.hardtanh_.default)) and tuple(r.args[1:]) == (0.0, 6.0)):
            continue
        a = r.args[0]
        if not (call(a, (aten.add.Tensor,)) and len(a.args) == 2 and a.args[1] == 3 and len(a.users) == 1):
            continue
        x, u = a.args[0], only_user(r)
        if u is None:
            continue
        w = only_user(u)
        if call(u, muls) and other(u, r) is x and w is not None and times_sixth(w):
            target, last = aten.hardswish.default, w  # x * relu6(x + 3) / 6
        elif times_sixth(u) and u.args[0] is r:
            v = only_user(u)
            if call(v, muls) and other(v, u) is x:
                target, last = aten.hardswish.default, v  # x * (relu6(x + 3) / 6)
            else:
                target, last = aten.hardsigmoid.default, u  # relu6(x + 3) / 6
        else:
            continue
        with gm.graph.inserting_before(last):
            new = gm.graph.call_function(target, (x,))
        new.meta.update(last.meta)
        last.replace_all_uses_with(new)
        for dead in dict.fromkeys((last, u, r, a)):  # the arithmetic it replaces, last first
            if not dead.users:
                gm.graph.erase_node(dead)
        changed = True
    return changed


_EVAL_DROPOUTS = (torch.ops.aten.feature_dropout.default, torch.ops.aten.feature_dropout_.default,
                  torch.ops.aten.alpha_dropout.default, torch.ops.aten.alpha_dropout_.default,
                  torch.ops.aten.feature_alpha_dropout.default, torch.ops.aten.feature_alpha_dropout_.default)


def _eval_dropout_as_dropout(gm: GraphModule) -> bool:
    """``nn.Dropout2d`` / ``nn.AlphaDropout`` in eval mode (``feature_dropout(x, p, False)``, ...) as
    ``aten.dropout(x, p, False)``: all are the identity then, and ``dropout`` is the spelling the quantizer
    (shared parameters) and the TFLite rewrites (an identity to look through) know."""
    changed = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _EVAL_DROPOUTS:
            train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
            if train is False:
                node.target = torch.ops.aten.dropout.default
                node.args, node.kwargs = (node.args[0], node.args[1], False), {}
                changed = True
    return changed


def _uniform_adaptive_pool_as_avg_pool(gm: GraphModule) -> bool:
    """``adaptive_avg_pool2d`` to an output size that divides the input size, other than the global 1×1,
    as ``avg_pool2d`` with kernel = stride = input / output: the same windows (each output cell averages
    one block of the input), the op TFLite computes (``AVERAGE_POOL_2D``, whose int8 form keeps its input's
    parameters). The global pool stays itself: it lowers to ``MEAN``, which may take a range of its own."""
    aten = torch.ops.aten
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != aten.adaptive_avg_pool2d.default:
            continue
        x, size = node.args[0], node.args[1]
        val = x.meta.get("val") if isinstance(x, Node) else None
        if val is None or val.dim() != 4 or any(isinstance(d, torch.SymInt) for d in val.shape[2:]):
            continue
        h, w = int(val.shape[2]), int(val.shape[3])
        oh, ow = (size, size) if isinstance(size, int) else (size[0], size[-1])
        oh, ow = h if oh is None else int(oh), w if ow is None else int(ow)
        if (oh, ow) == (1, 1) or h % oh or w % ow:
            continue
        kernel = [h // oh, w // ow]
        node.target = aten.avg_pool2d.default
        node.args, node.kwargs = (x, kernel, kernel), {}
        changed = True
    return changed


def _capture_error_line(model: nn.Module, exc: BaseException, dynamic_batch: bool) -> str:
    where = _offending_module(model, exc)
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    first = lines[0] if lines else type(exc).__name__
    if len(first) > 200:
        first = first[:197] + "..."
    hint = ""
    if dynamic_batch and re.search(r"[Cc]onstraint|specializ|batch", str(exc)):
        hint = " (the batch dimension may not be dynamic for this model: try dynamic_batch=False)"
    return f"cannot capture {type(model).__name__} at module {where!r}: {type(exc).__name__}: {first}{hint}"


def _offending_module(model: nn.Module, exc: BaseException) -> str:
    """The innermost module of ``model`` whose ``forward`` is on the failing traceback."""
    names = {id(m): n for n, m in model.named_modules()}
    found = "<root>"
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:  # follow the chain: export often re-raises
        seen.add(id(e))
        tb = e.__traceback__
        while tb is not None:
            owner = tb.tb_frame.f_locals.get("self")
            if owner is not None and id(owner) in names:
                found = names[id(owner)] or "<root>"
            tb = tb.tb_next
        e = e.__cause__ or e.__context__
    return found


# ---------------------------------------------------------------------------------------------------
# Layer names


def op_name(node: Node) -> str:
    """Short op name: ``aten.hardtanh_.default`` → ``hardtanh`` (in-place and out-of-place agree)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name.split("::")[-1]
    else:
        name = getattr(target, "__name__", str(target))
    return name.rstrip("_") or name


def is_structural(node: Node) -> bool:
    """Nodes that compute nothing a backend must quantize: getitem, symbolic sizes, runtime asserts."""
    if node.op != "call_function":
        return True
    t = node.target
    if t is operator.getitem:
        return True
    if not isinstance(t, torch._ops.OpOverload):
        return True  # python builtins on SymInts (operator.mul, ...)
    name = t._schema.name.split("::")[-1]
    return name.startswith(("sym_", "_assert", "sym_constrain")) or t.namespace == "quantized_decomposed"


def _normalize_path(path: str) -> str:
    if path.startswith("L['self']"):
        path = path[len("L['self']"):]
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    return path.lstrip(".")


def _module_id(node: Node) -> str:
    """Innermost module path of ``node`` plus ``@k`` for the k-th call of a reused module."""
    stack = node.meta.get("nn_module_stack") or {}
    entries = [(k, v) for k, v in stack.items() if not _NOT_A_MODULE.match(k)]
    if not entries:
        return ""
    key, (path, _type) = entries[-1]
    path = _normalize_path(path)
    call = key.rsplit("@", 1)[1] if "@" in key else ""
    return f"{path}@{call}" if call and call != "0" else path


def name_layers(gm: GraphModule) -> None:
    """Fill ``node.meta["mq_name"]`` on every call_function node (deterministic, unique)."""
    by_module: dict[str, list[Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_function":
            by_module[_module_id(node)].append(node)
    used: set[str] = set()
    for mid, nodes in by_module.items():
        compute = [n for n in nodes if not is_structural(n) and not _updates_buffer(n)]
        counters: dict[str, int] = defaultdict(int)
        for n in nodes:
            if n.target is operator.getitem:
                continue  # named after their source below
            if mid and len(compute) == 1 and n is compute[0]:
                name = mid
            else:
                op = op_name(n)
                name = f"{mid}.{op}_{counters[op]}" if mid else f"{op}_{counters[op]}"
                counters[op] += 1
            n.meta[MQ_NAME] = _unique(name, used)
    for node in gm.graph.nodes:  # getitem: after its source, whatever module recorded it
        if node.op == "call_function" and node.target is operator.getitem:
            src, idx = node.args[0], node.args[1]
            base = src.meta.get(MQ_NAME, src.name) if isinstance(src, Node) else str(src)
            node.meta[MQ_NAME] = _unique(f"{base}[{idx}]", used)


def _updates_buffer(node: Node) -> bool:
    """An in-place op on a module buffer, e.g. a training-mode BN's ``add_(num_batches_tracked, 1)``:
    bookkeeping, so the BN keeps its module path as its name in training and eval graphs alike."""
    t = node.target
    return (isinstance(t, torch._ops.OpOverload) and t._schema.name.endswith("_")
            and bool(node.args) and isinstance(node.args[0], Node) and node.args[0].op == "get_attr")


def _unique(name: str, used: set[str]) -> str:
    out, k = name, 1
    while out in used:
        out, k = f"{name}#{k}", k + 1
    used.add(out)
    return out


def node_arg(node: Node, index: int, name: str, default=None):
    """Argument ``index`` of an op node, given by position or by ``name`` (``default`` when absent)."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def layer_name(node: Node) -> str:
    """The stable layer name of ``node`` (placeholders and attributes: their graph name)."""
    return node.meta.get(MQ_NAME) or str(node.target if node.op in ("get_attr", "placeholder") else node.name)


def find_unsupported_ops(gm: GraphModule, supported: Collection) -> list[tuple[str, str]]:
    """Every compute op whose target is not in ``supported``, as ``(mq_name, "aten.op.overload")``.

    Structural nodes (getitem, symbolic sizes, asserts) are never reported.
    """
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or is_structural(node):
            continue
        if node.target not in supported:
            out.append((layer_name(node), str(node.target)))
    return out
