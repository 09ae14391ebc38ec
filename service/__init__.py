"""The Ray Serve / gRPC serving layer, torch-free; the engine it serves through is `core/`.

- the Ray Serve application (`app.py`) and its deployment (`ray_deploy.py`: start or join Ray,
  deploy the serve config, stop cleanly); the serve config (`config.py`), a local Ray's
  environment (`local_ray.py`) and the `attnserve serve` supervisor (`supervisor.py`)
- the servicer (`servicer.py`: the attnserve.v1 rpcs over engines) and the proto mapping
  (`grpc_mapping.py`; `grpc_services.py` registers the services)
- security: TLS settings (`tls.py`), bearer tokens (`auth.py`), the front on Ray's HAProxy
  (`tls_front.py`, `attnserve-haproxy`: TLS, UNAVAILABLE instead of Ray's NOT_FOUND while no
  application is deployed, and a bound on the calls each replica holds, beyond which HAProxy
  answers RESOURCE_EXHAUSTED itself) and loopback binds for Ray's plaintext servers
  (`private_binds.py`)
- Prometheus metrics (`metrics.py`)
- the client SDK (`client.py`)
- attention pictures (`plotting.py`, the `plot` extra)
- batch inference on Ray Data (`batch/`)

The commands, `attnserve certs` and `attnserve render-k8s` included, are in `cli/`.
"""
