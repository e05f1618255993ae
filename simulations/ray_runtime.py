"""Start Flower's Ray backend ourselves, so that a slow or failed start is retried and cleaned up.

Flower's `RayBackend` calls `ray.init()` once and, when it fails, ends the simulation with
"An error was encountered" and nothing else. On a loaded machine Ray's raylet can miss its
fixed 30-second registration window ("The current node timed out during startup"), and the
processes the failed start spawned (gcs_server, raylet, agents) are nobody's any more: they
keep running, and keep the caller's stdout open, after the program exits. Flower skips its
own `ray.init()` when Ray is already up, so starting Ray here, with the same arguments Flower
would use, keeps Flower in charge of the federation and only makes the start robust.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil

from fedpeft.common.errors import FederationError

log = logging.getLogger("fedpeft.sim")
START_ATTEMPTS = 3


def _descendants() -> dict[int, psutil.Process]:
    try:
        return {p.pid: p for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return {}


def reap_new_processes(before: set[int], grace_s: float = 3.0) -> list[str]:
    """Terminate (then kill) this process's descendants that were not running `before`.

    Returns their names, so the caller can say what it cleaned up.
    """
    leftover = [p for pid, p in _descendants().items() if pid not in before]
    names = []
    for proc in leftover:
        try:
            names.append(proc.name())
            proc.terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(leftover, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=grace_s)
    return names


def _flower_init_args(init_args: dict[str, Any]) -> dict[str, Any]:
    """The arguments Flower's `RayBackend.init_ray` would pass (flwr 1.41), PYTHONPATH included."""
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    args = {"include_dashboard": False, **init_args}
    return {"runtime_env": {"env_vars": {"PYTHONPATH": pythonpath}}, **args}


@contextmanager
def ray_backend(init_args: dict[str, Any], attempts: int = START_ATTEMPTS) -> Iterator[None]:
    """Ray up for one Flower simulation; every process it started is gone afterwards.

    A failed start is cleaned up and retried `attempts` times, then raised as a
    FederationError that carries Ray's own message.
    """
    import ray

    if ray.is_initialized():  # someone else's Ray (a notebook, a test): use it, leave it alone
        yield
        return
    before = set(_descendants())
    for attempt in range(1, attempts + 1):
        try:
            ray.init(**_flower_init_args(init_args))
            break
        except Exception as exc:  # Ray raises bare Exception/RuntimeError from its node start
            ray.shutdown()
            reaped = reap_new_processes(before)
            if attempt == attempts:
                raise FederationError(f"Flower's Ray backend failed to start {attempts} times; last error: "
                                      f"{type(exc).__name__}: {exc}") from exc
            log.warning("Ray failed to start (attempt %d of %d: %s); cleaned up %d of its processes, retrying",
                        attempt, attempts, exc, len(reaped))
            time.sleep(2.0 * attempt)
    try:
        yield
    finally:
        ray.shutdown()  # Flower shuts Ray down at the end of a run too; this covers its failures
        reaped = reap_new_processes(before)
        if reaped:
            log.debug("stopped %d Ray processes left after shutdown: %s", len(reaped), sorted(set(reaped)))


def run_flower_simulation(server_app: Any, client_app: Any, num_supernodes: int, backend_config: dict[str, Any]) -> None:
    """Flower's `run_simulation`, on a Ray backend started (and cleaned up) by `ray_backend`."""
    from flwr.simulation import run_simulation

    with ray_backend(dict(backend_config.get("init_args") or {})):
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_supernodes,
                       backend_config=backend_config)
