"""Starting or joining Ray the way this project needs: loopback only, offline, with the project importable."""

from __future__ import annotations

import os
from pathlib import Path

import ray

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Environment for every Ray worker: no hub access ever, and Ray bound to loopback on a single machine.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def init_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join the cluster at `address` ("auto" for the one on this machine), or start a private local one
    bound to 127.0.0.1 when `address` is None."""
    if ray.is_initialized():
        return
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    runtime_env = {"env_vars": dict(WORKER_ENV)}
    if address is None:
        ray.init(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            runtime_env=runtime_env,
            log_to_driver=False,
        )
    else:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
