"""The public Python API; the CLI is a thin shell over these functions.

Each function takes plain values (names, paths, numbers), runs one job through the pipeline
(zoo → capture/fusion → quantization → export → runtime → audit) and returns a small result object with
``summary()`` (for people) and ``to_dict()`` (for ``--json``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import UsageError

__all__ = ["ZooInfo", "zoo_info", "zoo_list"]


# --------------------------------------------------------------------------------------------- zoo
@dataclass
class ZooList:
    models: list[dict]

    def to_dict(self) -> dict:
        return {"models": self.models}

    def summary(self) -> str:
        if not self.models:
            return "no model matches"
        w = max(len(m["name"]) for m in self.models)
        lines = [f"{'name':<{w}}  {'family':<14} paper"]
        lines += [f"{m['name']:<{w}}  {m['family']:<14} {m['paper']}" for m in self.models]
        return "\n".join(lines)


def zoo_list(pattern: str = "*") -> ZooList:
    """Registered models whose name matches the shell-style ``pattern``."""
    from .models import list_models, model_info

    names = list_models(pattern)
    return ZooList([{"name": n, "family": model_info(n).family, "paper": model_info(n).paper} for n in names])


@dataclass
class ZooInfo:
    name: str
    family: str
    paper: str
    resolution: int
    num_classes: int
    params: int
    madds: int
    paper_params_m: float | None
    paper_madds_m: float | None
    targets: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        def paper(v):
            return "n/a" if v is None else f"{v:g} M"

        return "\n".join([
            f"{self.name}  ({self.family}; {self.paper})",
            f"  parameters  {self.params / 1e6:8.3f} M   (paper {paper(self.paper_params_m)})",
            f"  mult-adds   {self.madds / 1e6:8.1f} M   at {self.resolution}x{self.resolution}, "
            f"{self.num_classes} classes   (paper {paper(self.paper_madds_m)})",
            f"  targets     {', '.join(self.targets)}",
        ])


TARGETS = ("tflite-int8", "tflite-fp16", "tflite-fp32", "onnx-int8", "onnx-fp16", "onnx-fp32")


def zoo_info(name: str, resolution: int = 224, num_classes: int = 1000, width_mult: float | None = None) -> ZooInfo:
    """Parameters and mult-adds of one zoo model at ``resolution`` (built on the meta device: no memory)."""
    import torch

    from .models import count_madds, count_params, create_model, model_info

    if resolution < 16:
        raise UsageError(f"--resolution must be at least 16, got {resolution}")
    info = model_info(name)
    kwargs = {"num_classes": num_classes}
    if width_mult is not None:
        kwargs["width_mult"] = width_mult
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    return ZooInfo(name, info.family, info.paper, resolution, num_classes, count_params(model),
                   count_madds(model, (model.preprocess.input_size[0], resolution, resolution)),
                   info.paper_params_m, info.paper_madds_m, list(TARGETS))
