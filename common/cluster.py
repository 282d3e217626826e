"""Joining the Ray cluster a job was pointed at (RAY_ADDRESS), or saying plainly why it cannot be joined.

`ray.init(address=...)` against an address where nothing listens retries for minutes and then raises a
traceback; a typo in RAY_ADDRESS deserves one line, at once. And a driver started by hand (`python jobs/...`
with RAY_ADDRESS set, not `ray job submit`) runs its workers in the cluster's environment, not its own: the
settings our workers read from the environment are forwarded to them, as a submitted job's runtime
environment would carry them.
"""

from __future__ import annotations

import os
import re
import socket

from common.errors import UserError

# What our workers read from the environment: our own knobs (GLMOPS_CACHE among them: where the driver put
# converted checkpoints), the offline switches, PyTorch's allocator, Ray Train's controller settings. Not the
# machine's own paths (HF_HOME and the like may not exist on other nodes), and no secrets: a runtime
# environment is shown on Ray's dashboard to anyone who can see it.
FORWARDED_PREFIXES = ("GLMOPS_", "RAY_TRAIN_")
FORWARDED = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PYTORCH_CUDA_ALLOC_CONF")
SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)
SUBMITTED = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a job started with `ray job submit`
HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[\w.\-]+)):(?P<port>\d+)$")


def forwarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The driver's settings that its workers must see too (no secrets)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items()
            if (k.startswith(FORWARDED_PREFIXES) or k in FORWARDED) and not SECRET.search(k)}


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Raise a UserError at once when nothing answers at a host:port RAY_ADDRESS (other forms, such as
    ray://, auto or local, are left to Ray)."""
    match = HOST_PORT.match(address.strip())
    if not match:
        if address.strip().startswith(("http://", "https://")):
            raise UserError(f"RAY_ADDRESS={address} is a job-submission (dashboard) address; a job run directly "
                            "needs the cluster's GCS address, e.g. 127.0.0.1:6379 (`ray status` prints it), or "
                            f"submit it with `ray job submit --address {address} -- python jobs/...`.")
        return
    host, port = match["v6"] or match["host"], int(match["port"])
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        raise UserError(f"nothing answers at RAY_ADDRESS={address} ({err.strerror or err}). Start the cluster "
                        "there (`ray start --head`), correct RAY_ADDRESS, or unset it to train on a local Ray "
                        "on this machine.") from None


def join(address: str) -> None:
    """ray.init against the cluster at `address`, the driver's worker settings forwarded unless Ray's job
    submission already set the job's environment."""
    import ray

    check_reachable(address)
    runtime_env = None if SUBMITTED in os.environ else {"env_vars": forwarded_env()}
    try:
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
    except ConnectionError as err:
        raise UserError(f"could not join the Ray cluster at RAY_ADDRESS={address}: {err}. If the cluster "
                        "uses token authentication, set RAY_AUTH_TOKEN (or RAY_AUTH_MODE=disabled where it is "
                        "off).") from None
