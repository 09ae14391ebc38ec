"""Benchmarks: every model on the Ray path, a plain gRPC server and in-process; overload."""
