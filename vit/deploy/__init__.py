"""Deployment: runners that check themselves against eager PyTorch (``runners.py``: eager, compile,
onnxruntime; int8), prediction on image files (``predict.py``) and export to ONNX / torch.export (``export.py``)."""
