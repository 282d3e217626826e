"""Ray Serve app: `serve run serving:app [model=models:/<name>@champion] [bits=4] [port=8000] ...`.

`app` is a typed application builder: every field of AppArgs can be given as key=value on the command line
(or under `args:` in a Serve config file for `serve deploy`).
"""


import os

from pydantic import BaseModel

from common.config import ServeConfig


def _default(name: str, env: str | None = None):
    value = os.environ.get(env) if env else None
    return value if value is not None else ServeConfig.__dataclass_fields__[name].default


class AppArgs(BaseModel):
    model: str = _default("model", "GLMOPS_SERVE_MODEL")
    bits: int = 16
    dtype: str = "auto"
    device: str = "auto"
    replicas: int = 1
    max_concurrent_requests: int = 32
    host: str = _default("host", "GLMOPS_SERVE_HOST")
    port: int = int(_default("port", "GLMOPS_SERVE_PORT"))
    api_key: str | None = os.environ.get("GLMOPS_API_KEY")
    template: str | None = None
    tracking_uri: str | None = None
    ui: bool = True  # the Gradio page at /ui


def app(args: AppArgs):
    from ray import serve

    from serving.api import Ingress
    from serving.model import deployment

    if args.bits not in (4, 8, 16):
        raise ValueError(f"bits must be 4, 8 or 16, not {args.bits}")
    # Bind where asked (loopback by default) before `serve run` would start HTTP on its defaults.
    serve.start(http_options={"host": args.host, "port": args.port})
    gpus = 1.0 if args.device in ("cuda", "auto") and _has_gpu() else 0.0
    model = deployment(args.replicas, args.max_concurrent_requests, gpus).bind(
        args.model, bits=args.bits, dtype=args.dtype, device=args.device, template=args.template,
        tracking_uri=args.tracking_uri)
    return Ingress.bind(model, api_key=args.api_key, model_name=args.model, ui=args.ui)


def _has_gpu() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
