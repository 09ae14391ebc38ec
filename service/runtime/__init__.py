"""Torch-free model runtime: ONNX Runtime sessions and the numpy decode loop."""
