"""The torch-free serving side. `core/` needs neither Ray nor protos (manifest, tokenizers, decode
loop, engine); the rest is the Ray Serve / gRPC layer (app, server, grpc_mapping, metrics, client)."""
