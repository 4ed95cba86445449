"""Involution layer, RedNet/ResNet builders, the model registry and weight loading."""

from rednet.models.factory import build_model, create_model
from rednet.models.involution import ConvNormAct, Involution
from rednet.models.registry import list_models, register_model
from rednet.models.resnet import ResNet  # its import registers the RedNet and ResNet builders
from rednet.models.weights import load_weights

__all__ = ["Involution", "ConvNormAct", "ResNet", "create_model", "list_models", "register_model", "load_weights",
           "build_model"]
