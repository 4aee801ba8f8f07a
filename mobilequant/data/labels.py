"""Labels fitted to the model that is judged on them, before any figure is computed from them.

A class-folder data set labels its images by the folders' sorted position (``ImageData.classes``), which is
right only when the folders are exactly the model's classes in the model's order. :func:`fit_labels`
decides what the folder names mean, in this order:

1. every folder name is one of the model's ``class_names`` (case, spaces and ``_ - / .`` ignored: a folder
   ``T-shirt_top`` is Fashion-MNIST's ``T-shirt/top``): the label is that class's index — the folders may
   be a subset of the classes;
2. every folder name is a decimal integer: the label is that integer (``0``, ``285``, ``967`` …);
3. the model has no ``class_names`` and there are exactly as many folders as it has classes: sorted
   position, as torchvision's ``ImageFolder`` (and so a model trained with it) numbers them;
4. otherwise the labels cannot be trusted: they are dropped with a :class:`LabelWarning` (figures that need
   labels are then not reported; those that compare the file with the float model still are).

Then every label, from folders or from an array file, must be a class of the model: one outside
``0 … classes − 1`` is an :class:`~mobilequant.errors.InputError` naming the data, before any work. A
model whose output is not ``N × classes`` (a dense segmentation head) takes no image labels: they are
dropped with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import InputError
from .readers import ImageData

__all__ = ["LabelWarning", "fit_labels"]


class LabelWarning(UserWarning):
    """Class-folder labels that cannot be matched to the model's classes were dropped."""


def _output_shape(model: nn.Module, input_size: Sequence[int]) -> tuple[int, ...] | None:
    """The shape of ``model``'s output on two zero images; ``None`` when it cannot run or gives no tensor."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_size))  # 2: a captured graph may not take a batch of one
    except Exception:  # noqa: BLE001 - a model that cannot take this input fails later, with its own message
        return None
    finally:
        model.train(was_training)
    return tuple(out.shape) if torch.is_tensor(out) else None


def _key(name: str) -> str:
    return "".join(ch for ch in name.casefold() if ch not in "_- /.")


def _folder_labels(classes: tuple[str, ...], num_classes: int, class_names: Sequence[str] | None,
                   source: str) -> list[int] | None:
    """The model's label for each folder (in ``classes`` order), or ``None`` when there is none to trust."""
    if class_names:
        index = {_key(n): i for i, n in enumerate(class_names)}
        if all(_key(c) in index for c in classes):
            return [index[_key(c)] for c in classes]
    if all(c.isdecimal() for c in classes):
        labels = [int(c) for c in classes]
        if max(labels) >= num_classes:
            raise InputError(f"{source}: class folder {classes[labels.index(max(labels))]!r} is a class index "
                             f"but the model has {num_classes} classes (0 … {num_classes - 1})")
        return labels
    if len(classes) == num_classes and not class_names:
        return list(range(num_classes))
    return None


def fit_labels(data: ImageData, model: nn.Module) -> ImageData:
    """``data`` with labels that mean the model's classes (see the module docstring); unchanged when the
    model's output is not a class score vector or the data have no labels."""
    if data.labels is None or len(data) == 0:
        return data
    shape = _output_shape(model, data.input_size)
    if shape is None:
        return data
    if len(shape) != 2:  # a dense output (segmentation): one label per image means nothing for it
        warnings.warn(f"{data.source}: labels not used — the model's output is "
                      f"{'×'.join(['N', *map(str, shape[1:])])}, not N × classes; figures that need labels are "
                      "not reported", LabelWarning, stacklevel=2)
        return ImageData(data.images, None, data.source, None)
    num_classes = shape[1]
    class_names = getattr(model, "class_names", None)
    if data.classes is not None and tuple(data.classes) != tuple(class_names or ()):
        mapping = _folder_labels(tuple(data.classes), num_classes, class_names, data.source)
        if mapping is None:
            shown = ", ".join(data.classes[:4]) + (", …" if len(data.classes) > 4 else "")
            warnings.warn(f"{data.source}: labels not used — its {len(data.classes)} class folder(s) ({shown}) are "
                          f"neither the model's {num_classes} classes by name nor class indices"
                          f"{'' if class_names else ', and not one folder per class'}; name each folder by its "
                          f"class index (0 … {num_classes - 1})",
                          LabelWarning, stacklevel=2)
            return ImageData(data.images, None, data.source, None)
        if mapping != list(range(len(mapping))):
            data = ImageData(data.images, torch.tensor(mapping, dtype=torch.int64)[data.labels], data.source,
                             data.classes)
    lo, hi = int(data.labels.min()), int(data.labels.max())
    if lo < 0 or hi >= num_classes:
        raise InputError(f"labels of {data.source} run from {lo} to {hi} but the model has {num_classes} "
                         f"classes (0 … {num_classes - 1})")
    return data
