"""Benchmarks: gRPC load against the service next to the same batching in-process."""
