"""Ray's worker process setup hook for a local `attnserve serve`: every Ray worker runs `apply` at
start-up, before Serve binds or answers anything (`set_local_environment` names it in the
environment of the local Ray, which every worker inherits).

- `private_binds.apply`: with TLS, Serve's plaintext gRPC servers bind loopback.
- `answer_unknown_application_as_starting`: in HAProxy mode, Serve's Python fallback proxy answers
  UNAVAILABLE "attnserve is starting or redeploying; retry" where it would answer NOT_FOUND
  "Application metadata not set. Ping /ray.serve.RayServeAPIService/ListApplications ..." (or
  "Application '<name>' not found ...").

Why the second: HAProxy hands the proxy a call only for an application HAProxy knows (the proxy
is the backup server of each application's backend), so the proxy not knowing it means the
application is still being deployed (the proxy learns it a little after HAProxy) or being
removed (a redeploy; HAProxy's old process keeps serving open connections with its old
configuration for a while). NOT_FOUND would be untrue and is not retried. HAProxy's own answers
are rewritten in its configuration (`tls_front.answer_starting_as_unavailable`), but the proxy
sends its status in HTTP/2 trailers, which HAProxy 2.8 cannot rewrite: so it is changed here.
The patch waits for Serve's proxy module to be imported (Serve's own processes import it
anyway), so a worker that never runs Serve does not pay for importing it. The KubeRay
manifests (deploy/kubernetes/rayservice.template.yaml) set the same hook on every Ray container.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
from collections.abc import Callable
from types import ModuleType

import grpc

from attnserve.service import private_binds

log = logging.getLogger("attnserve")

# Ray's worker process setup hook, as `ray.init(runtime_env={"worker_process_setup_hook": ...})`
# passes it to workers; set in the environment of the local Ray, every worker process inherits it.
SETUP_HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"
SETUP_HOOK = "attnserve.service.worker_setup.apply"
PROXY_MODULE = "ray.serve._private.proxy"


def apply() -> None:
    """What every worker of a local Ray runs at start-up."""
    private_binds.apply()
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        when_imported(PROXY_MODULE, answer_unknown_application_as_starting)


def answer_unknown_application_as_starting(proxy: ModuleType) -> None:
    """Serve's gRPC proxy (in module `proxy`) answers UNAVAILABLE, in plain words, for a call to
    an application it does not know, instead of NOT_FOUND in Ray's (module docstring)."""
    from attnserve.service.tls_front import STARTING_MESSAGE

    status = proxy.ResponseStatus  # the proxy's final message to its gRPC server

    async def not_found_response(self, proxy_request):
        yield status(code=grpc.StatusCode.UNAVAILABLE, message=STARTING_MESSAGE, is_error=True)

    proxy.gRPCProxy.not_found_response = not_found_response


def when_imported(name: str, then: Callable[[ModuleType], None]) -> None:
    """Runs `then(module)` once module `name` has been executed: now if it already has been, else
    right after its import (a finder at the front of sys.meta_path wraps its loader). If `then`
    fails (Ray changed), the module is left as it is and a warning is logged."""
    if name in sys.modules:
        _run(then, sys.modules[name])
    else:
        sys.meta_path.insert(0, _AfterImport(name, then))


def _run(then: Callable[[ModuleType], None], module: ModuleType) -> None:
    try:
        then(module)
    except Exception as e:  # never break Serve's import over an answer's wording
        log.warning("could not change %s (%r); it keeps Ray's answers", module.__name__, e)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds one module as Python would, and runs a function on it after it is executed."""

    def __init__(self, name: str, then: Callable[[ModuleType], None]):
        self.name, self.then, self.done = name, then, False

    def find_spec(self, fullname, path, target=None):
        if self.done or fullname != self.name:
            return None
        self.done = True
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute, then = spec.loader.exec_module, self.then

        def exec_module(module: ModuleType) -> None:
            execute(module)
            _run(then, module)

        spec.loader.exec_module = exec_module
        return spec
