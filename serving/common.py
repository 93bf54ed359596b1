"""What every Serve application shares: decoding uploads, one error shape, mapping library errors to
HTTP answers, and deploying a config file's applications through Serve's public API.

Every error answer is ``{"error": reason}`` (4xx for what the client sent, 503 with the reason when a
model or store could not load). :func:`deploy_config` does what ``serve run serving/config.yaml``
does — the same applications, args and deployment options — and then waits on Serve's own application
status with a deadline, saying what it waits for and, when it gives up, why (e.g. the CPUs a
deployment asks for and the cluster lacks).
"""

import argparse
import asyncio
import base64
import binascii
import copy
import importlib
import inspect
import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image

from vlmlab.config import load_yaml

log = logging.getLogger("ray.serve")

CONFIG_PATH = Path(__file__).with_name("config.yaml")
DEFAULT_START_TIMEOUT_S = 600.0


class Unavailable(RuntimeError):
    """A model, store or index failed to load; the reason is in the message and the replica log (503)."""


# --------------------------------------------------------------------------- requests


def decode_upload(data: bytes, max_bytes: int) -> Image.Image:
    """The RGB image of an uploaded file, or an ``HTTPException``: 413 over ``max_bytes``, 400 empty/undecodable."""
    from vlmlab.images import ImageDecodeError, decode_image

    if len(data) > max_bytes:
        raise HTTPException(413, f"image is {len(data)} bytes; the limit is {max_bytes}")
    if not data:
        raise HTTPException(400, "image is empty")
    try:
        return decode_image(data)
    except ImageDecodeError as exc:
        raise HTTPException(400, f"image could not be decoded: {exc}") from exc


def decode_base64_image(text: str, max_bytes: int) -> Image.Image:
    """The image of a base64 (optionally ``data:...;base64,``) string; 400 when it is not base64."""
    try:
        data = base64.b64decode(text.split(",", 1)[-1], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HTTPException(400, f"image is not valid base64: {exc}") from exc
    return decode_upload(data, max_bytes)


# --------------------------------------------------------------------------- errors


def cause(exc: BaseException) -> BaseException:
    """The user-code exception behind a Ray error raised through a DeploymentHandle."""
    return getattr(exc, "cause", None) or exc


def client_error(exc: BaseException) -> HTTPException | None:
    """The HTTP answer a library exception maps to (404 unknown id, 400 bad input, 503 unavailable), or None
    when it is a server fault."""
    from vlmlab.filters import FilterError
    from vlmlab.images import ImageDecodeError

    exc = cause(exc)
    if isinstance(exc, Unavailable):
        return HTTPException(503, str(exc))
    if isinstance(exc, KeyError):
        return HTTPException(404, f"unknown id {exc.args[0] if exc.args else ''}")
    if isinstance(exc, (FilterError, ImageDecodeError, ValueError)):
        return HTTPException(400, str(exc))
    return None


async def call(response: Any) -> Any:
    """Await a DeploymentHandle call, turning library errors into their HTTP answers."""
    try:
        return await response
    except Exception as exc:
        http = client_error(exc)
        if http is not None:
            raise http from exc
        raise


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error as ``{"error": reason}`` (FastAPI's request validation included: 422 with the
    offending field; absolute paths cut to their last component). Call before ``@serve.ingress(app)``:
    Serve takes the app's handlers then."""

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": public_message(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        reasons = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
            reasons.append(f"{where}: {error.get('msg', 'invalid')} ({error.get('type', 'invalid')})")
        return JSONResponse({"error": "; ".join(reasons) or "invalid request"}, status_code=422)


# --------------------------------------------------------------------------- deploying


def options_of(overrides: dict[str, dict[str, Any]] | None, name: str) -> dict[str, Any]:
    """The options of deployment ``name`` (``Deployment.options(**...)``) from a config's ``deployments:``."""
    return dict((overrides or {}).get(name, {}))


def _import(import_path: str) -> Callable[..., Any]:
    module, _, attr = import_path.partition(":")
    return getattr(importlib.import_module(module), attr)


def deploy_config(
    config_path: str | Path = CONFIG_PATH,
    apps: Sequence[str] = ("search",),
    app_args: dict[str, Any] | None = None,
    host: str | None = None,
    port: int | None = None,
    deployment_options: dict[str, dict[str, Any]] | None = None,
    timeout_s: float = DEFAULT_START_TIMEOUT_S,
    args_by_app: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Deploy applications of a Serve config file on the connected Ray, as ``serve run FILE`` does, and wait
    until they run; returns the config dict deployed.

    ``app_args`` update the ``args:`` of the named ``apps`` (e.g. ``{"store": ...}``), ``args_by_app`` those of
    one app each (``{"inspect": {"detector": ...}}``);
    ``deployment_options`` update deployments by name (e.g. ``{"QueryEncoder": {"ray_actor_options":
    {"num_gpus": 0}}}``). On a cluster without GPUs, fractional ``num_gpus`` is set to 0 (logged).
    Raises ``TimeoutError`` naming each deployment's state, and the resources it asks for against what
    the cluster has, when the applications are not running after ``timeout_s``; ``RuntimeError`` when
    Serve reports a failed deploy.
    """
    import ray
    from ray import serve

    config = copy.deepcopy(load_yaml(config_path))
    config["applications"] = [a for a in config.get("applications", []) if a["name"] in apps]
    missing = set(apps) - {a["name"] for a in config["applications"]}
    if missing:
        raise ValueError(f"{config_path} has no application(s) {sorted(missing)}")
    http = dict(config.get("http_options") or {})
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = port
    no_gpu = ray.cluster_resources().get("GPU", 0) == 0
    serve.start(http_options=http, proxy_location=config.get("proxy_location", "EveryNode"))
    targets = []
    for application in config["applications"]:
        application.setdefault("args", {}).update(app_args or {})
        application["args"].update((args_by_app or {}).get(application["name"], {}))
        overrides: dict[str, dict[str, Any]] = {}
        for deployment in application.get("deployments", []):
            deployment.update(copy.deepcopy((deployment_options or {}).get(deployment["name"], {})))
            actor = deployment.get("ray_actor_options") or {}
            if no_gpu and actor.get("num_gpus"):
                log.warning("no GPU in the cluster: %s runs on CPU (num_gpus %s -> 0)", deployment["name"],
                            actor["num_gpus"])
                actor["num_gpus"] = 0
            overrides[deployment["name"]] = {k: v for k, v in deployment.items() if k != "name"}
        built = _import(application["import_path"])(application["args"], overrides)
        targets.append(serve.RunTarget(built, name=application["name"],
                                       route_prefix=application.get("route_prefix", "/")))
    serve.run_many(targets, wait_for_applications_running=False)
    wait_until_running([a["name"] for a in config["applications"]], timeout_s, config["applications"])
    return config


def _requested(application: dict[str, Any]) -> dict[str, float]:
    """Resources an application's deployments ask for at their minimum replica counts."""
    total: dict[str, float] = {}
    for deployment in application.get("deployments", []):
        autoscaling = deployment.get("autoscaling_config") or {}
        replicas = autoscaling.get("min_replicas", deployment.get("num_replicas", 1))
        replicas = 1 if replicas == "auto" else replicas
        actor = deployment.get("ray_actor_options") or {}
        for key, value in (("CPU", actor.get("num_cpus", 1)), ("GPU", actor.get("num_gpus", 0))):
            total[key] = total.get(key, 0.0) + float(value or 0) * max(1, int(replicas))
    return total


def wait_until_running(names: Sequence[str], timeout_s: float, applications: Sequence[dict[str, Any]] = ()) -> None:
    """Block until Serve reports every application in ``names`` RUNNING; see :func:`deploy_config`."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    log.info("waiting up to %.0f s for Serve application(s) %s to run", timeout_s, ", ".join(names))
    while True:
        status = serve.status().applications
        states = {name: status[name].status if name in status else "NOT_STARTED" for name in names}
        failed = [n for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            details = "; ".join(f"{n}: {status[n].message}" for n in failed)
            raise RuntimeError(f"Serve could not deploy {', '.join(failed)}: {details}")
        if all(s == "RUNNING" for s in states.values()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(_not_running(names, states, status, applications, timeout_s))
        time.sleep(0.5)


def _not_running(names: Sequence[str], states: dict[str, str], status: dict[str, Any],
                 applications: Sequence[dict[str, Any]], timeout_s: float) -> str:
    """Why applications did not come up: each deployment's state, and what they ask for against the cluster."""
    import ray

    lines = []
    for name in names:
        app = status.get(name)
        deployments = {d: f"{s.status} {s.message}".strip() for d, s in (app.deployments if app else {}).items()}
        lines.append(f"{name}: {states[name]} {deployments}")
    need: dict[str, float] = {}
    for application in applications:
        for key, value in _requested(application).items():
            need[key] = need.get(key, 0.0) + value
    have = {k: ray.cluster_resources().get(k, 0.0) for k in need}
    return (f"Serve application(s) not running after {timeout_s:.0f} s: {'; '.join(lines)}. They ask for {need} "
            f"at their minimum replicas; the cluster has {have} (lower num_cpus/num_replicas in the config, "
            "free the cluster's CPUs, or add nodes)")


def app_parser(prog: str, description: str, args_cls: type, positionals: dict[str, dict[str, Any]] | None = None,
               skip: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The command line of an app's verb: its ``positionals`` (name: ``add_argument`` options), ``--port
    --host --config --address --start-timeout``, one flag per field of ``args_cls`` (its ``args:`` block;
    ``skip`` fields are set by positionals) and ``key=value`` overrides."""
    from vlmlab.config import add_config_arguments

    parser = argparse.ArgumentParser(prog=prog, description=description)
    for name, options in (positionals or {}).items():
        parser.add_argument(name, **options)
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    parser.add_argument("--host", default=None, help="HTTP host (default: the config's, 127.0.0.1)")
    parser.add_argument("--config", default=str(CONFIG_PATH), help="Serve config file (default: serving/config.yaml)")
    parser.add_argument("--address", default=None, help="Ray address (default: start or join a local Ray)")
    parser.add_argument("--start-timeout", type=float, default=DEFAULT_START_TIMEOUT_S,
                        help="longest wait for the app to run before saying why it does not (seconds)")
    add_config_arguments(parser, args_cls, skip=tuple(skip))
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the app's args")
    return parser


def run_app(args: argparse.Namespace, app_name: str, args_cls: type, path: str,
            fixed: dict[str, Any] | None = None) -> None:
    """Deploy ``app_name`` with the parsed flags and overrides (``fixed`` args win) and serve until Ctrl-C;
    a typo in an arg fails before anything starts. ``path`` is what the ready message points at."""
    from vlmlab.config import build_config, parse_overrides
    from vlmlab.runtime import start_ray

    app_args = {k: v for k, v in vars(args).items() if k in args_cls.__dataclass_fields__ and v is not None}
    app_args.update(parse_overrides(args.overrides))
    app_args.update(fixed or {})
    build_config(args_cls, app_args)
    start_ray(args.address, namespace="serve")
    deploy_config(args.config, apps=(app_name,), app_args=app_args, host=args.host, port=args.port,
                  timeout_s=args.start_timeout)
    serve_forever(f"{app_name} app running: http://{args.host or '127.0.0.1'}:{args.port}{path}  (Ctrl-C stops it)")


def serve_forever(message: str) -> None:
    """Print ``message`` and keep the driver (and so its embedded Serve) alive until Ctrl-C."""
    from ray import serve

    print(message, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


# --------------------------------------------------------------------------- calling the parts


class InProcess:
    """An object in this replica behind a DeploymentHandle's calling convention: ``part.method.remote(...)``
    returns an awaitable (coroutines as they are, plain methods in a worker thread), so the ingress code is
    the same whether a part lives in its replica or in a deployment of its own."""

    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def __getattr__(self, name: str) -> "_InProcessMethod":
        return _InProcessMethod(getattr(self._obj, name))


class _InProcessMethod:
    def __init__(self, method: Callable[..., Any]) -> None:
        self._method = method

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Call the method; an awaitable either way."""
        if inspect.iscoroutinefunction(self._method):
            return self._method(*args, **kwargs)
        return asyncio.to_thread(self._method, *args, **kwargs)


def _replica_lost(exc: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(cause(exc), (ActorDiedError, ActorUnavailableError, RayActorError))


async def call_retrying(make_call: Callable[[], Any], attempts: int = 3) -> Any:
    """:func:`call` of ``make_call()``, made again (up to ``attempts`` times) when the replica serving it
    died: the handle routes the new call to a live replica, so a lost replica costs few requests."""
    for attempt in range(attempts):
        try:
            return await call(make_call())
        except HTTPException:
            raise
        except Exception as exc:
            if attempt + 1 < attempts and _replica_lost(exc):
                log.warning("a replica died under a request (%s); retrying on another", type(cause(exc)).__name__)
                continue
            raise
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- request limits


def install_request_limits(app: FastAPI) -> None:
    """Bound how long a client may take to send its body (``app.state.body_timeout_s``, default 15 s): a
    slow sender gets 408 and frees its slot instead of holding a replica's request capacity. Call at
    import, beside :func:`install_error_handlers`."""

    @app.middleware("http")
    async def _body_deadline(request: Request, call_next: Callable[[Request], Any]) -> Any:
        timeout = float(getattr(app.state, "body_timeout_s", 15.0))
        original = request._receive  # Starlette reads the body through this channel
        deadline = time.monotonic() + timeout
        body_done = False

        async def receive() -> dict[str, Any]:
            nonlocal body_done
            if body_done:  # later reads only watch for a disconnect while the answer is computed
                return await original()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _SlowBody()
            try:
                message = await asyncio.wait_for(original(), timeout=remaining)
            except TimeoutError:
                raise _SlowBody() from None
            body_done = message.get("type") != "http.request" or not message.get("more_body", False)
            return message

        request._receive = receive
        try:
            return await call_next(request)
        except _SlowBody:
            return JSONResponse({"error": f"the request body did not arrive within {timeout:g} s"}, status_code=408)


class _SlowBody(Exception):
    """The client did not send its request body in time."""


def public_message(text: str) -> str:
    """``text`` with absolute paths cut to their last component: error answers name the file, never where
    this machine keeps it."""
    return _ABSOLUTE_PATH.sub(lambda m: m.group(1), str(text))


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s'\"/]+/)+([^\s'\"/]*)")
