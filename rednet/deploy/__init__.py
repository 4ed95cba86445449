"""Deployment: export to ONNX (standard operators, BatchNorm folded, dynamic batch and size) and
running an exported file in ONNX Runtime. Needs the ``[deploy]`` extra (onnx, onnxruntime).

    from rednet.deploy import export_onnx, OnnxClassifier
    export_onnx(model, "model.onnx", in_chans=3, image_size=224)
    logits = OnnxClassifier("model.onnx")(images)
"""

from rednet.deploy.export import export_onnx, to_onnx
from rednet.deploy.runtime import OnnxClassifier

__all__ = ["export_onnx", "to_onnx", "OnnxClassifier"]
