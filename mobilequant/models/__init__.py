"""The model zoo of the mobile-network literature.

``create_model(name, num_classes=..., in_chans=..., width_mult=..., **kw)``, ``list_models(pattern)``,
``model_info(name)``. Every variant also takes ``resolution=`` (sets ``model.preprocess`` via
``with_resolution``) and ``preprocess=`` (a :class:`PreprocessConfig` to attach, e.g. ``FASHION_MNIST``).
Users' own models: ``load_model("pkg.module:factory")`` / ``load_model("file.py:factory")``; weights:
``load_checkpoint(model, path)`` (weights only). Complexity: ``count_params``, ``count_madds``
(torch's ``FlopCounterMode``). torchvision's ImageNet MobileNetV2: :mod:`mobilequant.models.pretrained`.
"""

from ._registry import (  # noqa: F401
    FASHION_MNIST,
    IMAGENET,
    ModelInfo,
    PreprocessConfig,
    create_model,
    list_models,
    model_info,
    register_model,
)

# Family modules register their variants on import; imported explicitly, one line each.
from . import mobilenetv1  # noqa: F401,E402
from . import mobilenetv2  # noqa: F401,E402
from . import mobilenetv3  # noqa: F401,E402
from . import shufflenetv1  # noqa: F401,E402
from . import shufflenetv2  # noqa: F401,E402
from . import squeezenet  # noqa: F401,E402
from . import fdmobilenet  # noqa: F401,E402
from . import igcv3  # noqa: F401,E402
from . import squeezenext  # noqa: F401,E402
from . import effnet  # noqa: F401,E402
from . import xception  # noqa: F401,E402
from .complexity import count_madds, count_params  # noqa: F401,E402
from .loading import load_checkpoint, load_model  # noqa: F401,E402
