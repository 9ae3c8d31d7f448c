"""Model registry and the built-in models."""

from samkit.models import small  # noqa: F401  (registers the built-in models)
from samkit.models.registry import create_model, is_model, list_models, register_model
from samkit.models.small import SmallResNet

__all__ = ["SmallResNet", "create_model", "is_model", "list_models", "register_model"]
