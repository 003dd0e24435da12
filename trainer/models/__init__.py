"""Model zoo: ``create_model(name, num_classes=...)`` builds any registered model.

Importing this package registers every family (one module per family). To add a family, write
``trainer/models/<family>.py`` with ``@register_model("<name>")`` builders (including one tiny
``<family>_debug`` variant for the CPU tests), import the module below and declare its debug variant
in ``_DEBUG_VARIANTS`` (tests/test_models.py fails for a family without one).

Registered:

* ``resnet18/34/50/101/152/200``, ``resnet_debug`` (``resnet.py``);
* ``wrn16_4``, ``wrn28_10``, ``wrn40_10``, ``wrn_debug`` (``wideresnet.py``);
* ``wrn26_2x96_shakeshake``, ``shakeshake_debug`` (``shakeshake.py``);
* ``pyramidnet164_48``, ``pyramidnet164_270``, ``pyramidnet200_240``, ``pyramidnet272_200``,
  ``pyramidnet164_48_shakedrop``, ``pyramidnet272_200_shakedrop``, ``pyramidnet_debug``
  (``pyramidnet.py``);
* ``vgg16``, ``vgg16_bn``, ``vgg19``, ``vgg19_bn``, ``vgg_debug`` (``vgg.py``);
* ``vit_ti``, ``vit_s``, ``vit_b``, ``vit_l``, ``vit_debug`` (``vit.py``; patch 4 below 128 px,
  16 above, or ``patch=``);
* ``demo_cnn`` (``demo.py``).

Shared conventions (BN settings, the reference's initialisation, Shake-Shake/ShakeDrop) live in
``layers.py``. Shake-Shake and ShakeDrop blocks carry a ``true_gradient`` attribute that the GNP
optimizer switches per pass. All models are plain ``torch.nn`` and import nothing else from
``trainer``.
"""

from . import demo, pyramidnet, resnet, shakeshake, vgg, vit, wideresnet  # noqa: F401  (registrations)
from .registry import (
    create_model,
    debug_variant,
    debug_variants,
    list_models,
    model_family,
    model_options,
    register_debug_variant,
    register_model,
)

# Each family's tiny member, which the CPU tests train in place of its full-size models (the demo's CNN is
# small enough to be its own).
_DEBUG_VARIANTS = (
    "demo_cnn",
    "pyramidnet_debug",
    "resnet_debug",
    "shakeshake_debug",
    "vgg_debug",
    "vit_debug",
    "wrn_debug",
)
for _name in _DEBUG_VARIANTS:
    register_debug_variant(_name)

__all__ = [
    "create_model",
    "debug_variant",
    "debug_variants",
    "list_models",
    "model_family",
    "model_options",
    "register_debug_variant",
    "register_model",
]
