"""Model registry (``create_model(name)``, timm-style) and the built-in models."""

from samkit.models import (  # noqa: F401  (importing registers the built-in models)
    cifar_resnet,
    imagenet,
    pyramidnet,
    shake_shake,
    small,
    wide_resnet,
)
from samkit.models.finetune import freeze_batchnorm_statistics, load_pretrained
from samkit.models.registry import (
    create_model,
    is_model,
    list_model_families,
    list_models,
    register_model,
    register_model_family,
)
from samkit.models.small import SmallResNet

__all__ = [
    "SmallResNet",
    "create_model",
    "freeze_batchnorm_statistics",
    "is_model",
    "list_model_families",
    "list_models",
    "load_pretrained",
    "register_model",
    "register_model_family",
]
