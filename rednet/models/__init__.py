"""Involution layer, RedNet/ResNet builders, the model registry and weight loading."""

from rednet.models import resnet  # noqa: F401  (registers the builders)
from rednet.models.involution import ConvNormAct, Involution
from rednet.models.registry import build_model, create_model, list_models, register_model
from rednet.models.resnet import ResNet
from rednet.models.weights import load_weights

__all__ = ["Involution", "ConvNormAct", "ResNet", "create_model", "list_models", "register_model", "load_weights",
           "build_model"]
