"""Model registry (``create_model(name)``, timm-style) and the built-in models."""

from samkit.models import (  # noqa: F401  (importing registers the built-in models)
    cifar_resnet,
    imagenet,
    pyramidnet,
    shake_shake,
    small,
    timm_models,
    wide_resnet,
)
from samkit.models.finetune import freeze_batchnorm_statistics, load_pretrained
from samkit.models.registry import (
    MAX_PARAMETERS,
    count_parameters,
    create_model,
    is_model,
    list_model_families,
    list_models,
    model_name_problem,
    register_model,
    register_model_family,
)
from samkit.models.small import SmallResNet

__all__ = [
    "MAX_PARAMETERS",
    "SmallResNet",
    "count_parameters",
    "create_model",
    "freeze_batchnorm_statistics",
    "is_model",
    "list_model_families",
    "list_models",
    "load_pretrained",
    "model_name_problem",
    "register_model",
    "register_model_family",
]
