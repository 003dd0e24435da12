"""Model zoo: ``create_model(name, num_classes=...)`` builds any registered model.

Importing this package registers every family (one module per family). To add a family, write
``trainer/models/<family>.py`` with ``@register_model("<name>")`` builders (including one tiny
``<family>_debug`` variant for the CPU tests) and import the module below.

Registered so far: ``resnet18/34/50/101/152/200`` and ``resnet_debug`` (``resnet.py``),
``wrn16_4``, ``wrn28_10``, ``wrn40_10`` and ``wrn_debug`` (``wideresnet.py``), ``demo_cnn``
(``demo.py``). All models are plain ``torch.nn`` and import nothing else from ``trainer``.
"""

from . import demo, resnet, wideresnet  # noqa: F401  (imported for their registrations)
from .registry import create_model, list_models, model_options, register_model

__all__ = ["create_model", "list_models", "model_options", "register_model"]
