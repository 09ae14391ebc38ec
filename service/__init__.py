"""The torch-free serving side: ONNX Runtime runtime, decoding, Ray Serve app, gRPC ingress, metrics."""
