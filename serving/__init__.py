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
    engine: str = "batch"                 # or "per_request": the old path, one generate thread per request
    max_num_seqs: int | None = None       # sequences decoded together (default: 128 on GPU, 16 on CPU)
    max_model_len: int | None = None      # prompt + reply tokens (default: the model's context, as memory allows)
    max_queued_requests: int = 256        # waiting beyond max_num_seqs; more get 429
    prefill_chunk: int | None = None      # prompt tokens in a step while nothing decodes (default: 2048 GPU, 512 CPU)
    prefix_cache: bool = True             # keep finished sequences' KV for the next turn (serving/prefix_cache.py)
    step_tokens: int | None = None        # a step's tokens while streams decode, decode rows + prompts (2048 GPU, 256 CPU)
    stream_interval: float = 0.04         # longest wait between two chunks of a stream (shorter while few streams run)
    decode_gemv: str = "auto"             # steps of <= 4 rows: projections through Triton where faster than cuBLAS, or "off"
    engine_process: bool | None = None    # the engine in a child process (default: on GPU; GIL-free of Serve)
    ingress_replicas: int | None = None   # HTTP front-end replicas (JSON and SSE encoding); default 2 on GPU, 1 on CPU
    max_concurrent_requests: int = 32     # engine="per_request" only: streams one replica runs at once
    host: str = _default("host", "GLMOPS_SERVE_HOST")
    port: int = int(_default("port", "GLMOPS_SERVE_PORT"))
    api_key: str | None = os.environ.get("GLMOPS_API_KEY")
    template: str | None = None
    tracking_uri: str | None = None
    ui: bool = True  # the Gradio page at /ui
    # LoRA adapters on the base, chosen per request by its `model` field (README, "Several fine-tunes on one base"):
    adapters: str | None = None  # name=URI,name2=URI2 (URI: runs:/<run_id>, models:/<name>@<alias>, a folder)
    max_loras: int = 4           # adapter slots on the device (0: no adapters); more adapters are swapped in LRU
    max_lora_rank: int = 64      # the largest adapter rank the slots hold
    lora_gather_max: int = 16    # GPU steps of up to this many tokens use the gathered adapter kernels (0: never)
    # Staying up (README, "When things fail"):
    request_timeout_s: float | None = None    # every request ends with a timeout error after this many seconds
    graceful_shutdown_timeout_s: float = 30.0  # on shutdown or redeploy, running streams get this long to finish
    stalled_client_timeout_s: float = 10.0     # a client that takes no output for this long is cut off (0: never)
    throughput_mode: bool = True  # Serve's throughput-optimized mode for the cluster `serve run` starts (see app())


def throughput_mode() -> None:
    """Ray Serve's throughput-optimized mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1: gRPC between deployments, the
    ingress replica answering HTTP itself, user code on the replica's own event loop) for the cluster this
    process is about to start; it reads the switch when its processes start. Its logging to stderr stays on, so
    the start-up line and errors still reach `serve run`'s console. Its HAProxy ingress stays off: it listens
    on every interface. A cluster of your own keeps Serve's defaults unless its nodes start with these set (infra/
    does not set them yet: the mode has not been tried across nodes)."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
        os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "1")
        # In this mode an ingress replica that stops keeps serving for a minimum draining period (30 s by default)
        # even with nothing in flight, so that a load balancer in front can drop it first. With no HAProxy, the
        # only router is Serve's own, which learns of it within a second or two; 30 s made every Ctrl-C (and each
        # serving test's teardown) wait half a minute for nothing. Requests in flight are still waited for.
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")


def app(args: AppArgs):
    import threading

    from ray import serve
    from ray._private.worker import SCRIPT_MODE, global_worker

    from serving import events
    from serving.api import Ingress
    from serving.draining import DRAIN_MARGIN_S, drain_on_signals, install_in_controller
    from serving.model import deployment
    from serving.slow_clients import install_in_proxy

    if args.bits not in (4, 8, 16):
        raise ValueError(f"bits must be 4, 8 or 16, not {args.bits}")
    if args.decode_gemv not in ("auto", "off"):
        raise ValueError(f"decode_gemv must be 'auto' or 'off', not {args.decode_gemv!r}")
    if args.request_timeout_s is not None and args.request_timeout_s <= 0:
        raise ValueError(f"request_timeout_s must be > 0 seconds, not {args.request_timeout_s}")
    if args.graceful_shutdown_timeout_s < 0 or args.stalled_client_timeout_s < 0:
        raise ValueError("graceful_shutdown_timeout_s and stalled_client_timeout_s must be >= 0 seconds")
    # The proxy cuts off clients that stop reading (serving/slow_clients.py): set before Ray starts.
    if args.stalled_client_timeout_s:
        install_in_proxy(args.stalled_client_timeout_s)  # the ingress warns if the cluster's proxy lacks it
    install_in_controller()
    if args.throughput_mode:
        throughput_mode()
    # Bind where asked (loopback by default) before `serve run` would start HTTP on its defaults.
    serve.start(http_options={"host": args.host, "port": args.port})
    if args.engine not in ("batch", "per_request"):
        raise ValueError(f"engine must be 'batch' or 'per_request', not {args.engine!r}")
    if args.max_loras < 0 or args.max_lora_rank < 1:
        raise ValueError(f"max_loras must be >= 0 and max_lora_rank >= 1, not {args.max_loras} and "
                         f"{args.max_lora_rank}")
    from serving.adapters import parse_adapters

    adapter_names = tuple(parse_adapters(args.adapters, args.model))  # a malformed list fails before replicas start
    gpus = 1.0 if args.device in ("cuda", "auto") and _has_gpu() else 0.0
    # With the engine, each replica decides itself what waits and what gets a 429: let Serve hand it
    # everything up to that (plus room for /health and /metrics calls).
    seqs = args.max_num_seqs or 128
    ongoing = seqs + args.max_queued_requests + 16 if args.engine == "batch" else args.max_concurrent_requests
    model = deployment(args.replicas, ongoing, gpus, args.graceful_shutdown_timeout_s).bind(
        args.model, bits=args.bits, dtype=args.dtype, device=args.device, template=args.template,
        tracking_uri=args.tracking_uri, engine=args.engine, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, max_queued_requests=args.max_queued_requests,
        prefill_chunk=args.prefill_chunk, prefix_cache=args.prefix_cache,
        step_tokens=args.step_tokens, stream_interval=args.stream_interval, engine_process=args.engine_process,
        request_timeout_s=args.request_timeout_s, drain_timeout_s=args.graceful_shutdown_timeout_s,
        adapters=args.adapters, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
        lora_gather_max=args.lora_gather_max, decode_gemv=args.decode_gemv)
    # Stopping drains (serving/draining.py): serve run's Ctrl-C or SIGTERM, and `serve shutdown` in the controller.
    events.set_draining(False)  # a new app on a cluster that drained an earlier one
    events.set_drain_plan(args.graceful_shutdown_timeout_s, args.replicas)
    if threading.current_thread() is threading.main_thread() and global_worker.mode == SCRIPT_MODE:
        drain_on_signals()  # else: a Ray worker building the app for `serve deploy`; Ray owns its signals
    ingress = args.ingress_replicas or (2 if gpus else 1)
    # The ingress holds the HTTP streams: it drains as long as the model, and a little longer.
    return Ingress.options(num_replicas=ingress, graceful_shutdown_wait_loop_s=0.5,
                           graceful_shutdown_timeout_s=args.graceful_shutdown_timeout_s + 2 * DRAIN_MARGIN_S
                           ).bind(model, api_key=args.api_key, model_name=args.model, ui=args.ui,
                                  stalled_client_timeout_s=args.stalled_client_timeout_s, adapter_names=adapter_names)


def _has_gpu() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
