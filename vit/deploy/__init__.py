"""Deployment: runners that check themselves against eager PyTorch (``runners.py``: eager, compile, onnxruntime,
openvino x fp32, bf16, int8; ``order.py``: the order "auto" tries), prediction on image files (``predict.py``) and
export to ONNX / OpenVINO IR / torch.export (``export.py``, ``onnx_backend.py``, ``openvino_backend.py``)."""
