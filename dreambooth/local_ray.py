"""Starting or joining Ray the way this project needs: loopback only when local, offline everywhere."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import ray

from dreambooth.durable import sync_dir
from dreambooth.ray_dashboard import WORKER_ENV


def ensure_ray_token() -> None:
    """Ray's token authentication is on (RAY_AUTH_MODE=token): `ray start --head` refuses to start without a
    token, where `ray.init()` would make one. Make it where Ray looks by default (~/.ray/auth_token), as
    `ray get-auth-token --generate` would, unless a token is given through Ray's environment variables.

    Created whole or not at all (written aside, then linked into place), readable by its owner only: a `ray
    start` beside this one (another stack, the tests) reads either no token or the one that won, never half."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = Path.home() / ".ray" / "auth_token"
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(f".auth_token.{os.getpid()}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))  # 256 bits, as Ray's own generator
            out.flush()
            os.fsync(out.fileno())  # an empty token after a power loss would be trusted for good
        os.link(draft, path)
        sync_dir(path.parent)
    except FileExistsError:
        pass  # another process made it first: that one is the token
    finally:
        draft.unlink(missing_ok=True)


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` ("auto" for the one started on this machine by `ray start`), or start a
    private single-machine one whose listeners are all on 127.0.0.1 when `address` is None."""
    if ray.is_initialized():
        return
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    runtime_env = {"env_vars": dict(WORKER_ENV)}
    if address is not None:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        return
    # Ray's single-machine mode binds every listener to 127.0.0.1. Ray reads the switch from the environment
    # when first imported (possibly before this call), and the processes ray.init starts read it again.
    import ray._private.ray_constants as ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    # With the dashboard comes the State API, which Ray Train's placement-group cleaner asks whether the run's
    # controller lives. Ray's processes would look for it through /tmp/ray's record of the last `ray start` (a
    # dead cluster, or another one), and every fit() would end 12 s late: they inherit its address from here.
    from dreambooth.stack import free_port

    dashboard_port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    ray.init(
        address="local",  # a new cluster, even if `ray start` left one's address on this machine
        num_cpus=num_cpus,
        include_dashboard=None,  # where its packages are (ray[default]); a bare Ray (the GPU bench bundle) refuses True
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        runtime_env=runtime_env,
        log_to_driver=False,
    )
