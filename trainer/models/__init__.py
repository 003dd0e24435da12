"""Model zoo: ``create_model(name, num_classes=...)`` builds any registered model.

Importing this package registers every family (one module per family). To add a family, write
``trainer/models/<family>.py`` with ``@register_model("<name>")`` builders (including one tiny
``<family>_debug`` variant for the CPU tests) and import the module below.

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
from .registry import create_model, list_models, model_options, register_model

__all__ = ["create_model", "list_models", "model_options", "register_model"]
