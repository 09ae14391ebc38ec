"""torch -> ONNX: load a checkpoint, export, parity-check, evaluate, write a repository entry."""
