"""Start Flower's Ray backend ourselves, so that a slow or failed start is retried and cleaned up.

Flower's `RayBackend` calls `ray.init()` once and, when it fails, ends the simulation with
"An error was encountered" and nothing else. On a loaded machine Ray's raylet can miss its
fixed 30-second registration window ("The current node timed out during startup"), and the
processes the failed start spawned (gcs_server, raylet, agents) are nobody's any more: they
keep running, and keep the caller's stdout open, after the program exits. Flower skips its
own `ray.init()` when Ray is already up, so starting Ray here, with the arguments Flower
would use, keeps Flower in charge of the federation and only makes the start robust.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import psutil

from fedpeft.common.errors import FederationError

log = logging.getLogger("fedpeft.sim")
START_ATTEMPTS = 3
RAY_BINARIES = ("gcs_server", "raylet")


def descendants() -> set[psutil.Process]:
    """This process's descendants (psutil.Process compares pid *and* start time: PID reuse is told apart)."""
    try:
        return set(psutil.Process().children(recursive=True))
    except psutil.Error:
        return set()


def _is_ray_process(proc: psutil.Process, ray_dir: str) -> bool:
    """gcs_server, raylet, `ray::` workers and agents, and Ray's Python helpers (dashboard, log monitor)."""
    try:
        name = proc.name()
        return name in RAY_BINARIES or name.startswith("ray::") or any(ray_dir in part for part in proc.cmdline())
    except psutil.Error:
        return False


def ray_processes(exclude: Iterable[psutil.Process] = ()) -> list[psutil.Process]:
    """Ray's processes among this process's descendants (and everything below them), less `exclude`."""
    import ray

    ray_dir = os.path.dirname(ray.__file__)
    skip = set(exclude)
    found: dict[psutil.Process, None] = {}
    for proc in descendants() - skip:
        if proc not in found and _is_ray_process(proc, ray_dir):
            found[proc] = None
            try:
                found.update((child, None) for child in proc.children(recursive=True) if child not in skip)
            except psutil.Error:
                pass
    return list(found)


def reap(processes: Iterable[psutil.Process], grace_s: float = 3.0) -> list[str]:
    """Terminate `processes`, then kill what is left after `grace_s`; returns their names."""
    procs, names = list(processes), []
    for proc in procs:
        try:
            names.append(proc.name())
            proc.terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=grace_s)
    return names


def flower_init_args(init_args: dict[str, Any]) -> dict[str, Any]:
    """The `ray.init` arguments Flower 1.41 would use: `run_simulation`'s key renaming and
    quiet defaults, then `RayBackend.init_ray`'s PYTHONPATH (which it also exports)."""
    from flwr.supercore.constant import DEFAULT_SIMULATION_CONFIG

    args = {key.replace("-", "_"): value for key, value in init_args.items()}
    args.setdefault("logging_level", DEFAULT_SIMULATION_CONFIG.init_args_logging_level)
    args.setdefault("log_to_driver", DEFAULT_SIMULATION_CONFIG.init_args_log_to_driver)
    args.setdefault("include_dashboard", False)
    entries = [*sys.path, *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    pythonpath = os.pathsep.join(dict.fromkeys(e for e in entries if e))  # Flower's, without repeats per run
    os.environ["PYTHONPATH"] = pythonpath
    if "runtime_env" in args:
        raise FederationError("backend init_args may not set runtime_env: Flower sets it (PYTHONPATH)")
    return {"runtime_env": {"env_vars": {"PYTHONPATH": pythonpath}}, **args}


def _stop_ray(before: set[psutil.Process]) -> list[str]:
    """`ray.shutdown()`, then reap every Ray process it left (listed before shutting down:
    a worker whose raylet died is re-parented and would not be found after)."""
    import ray

    leftover = ray_processes(exclude=before)
    try:
        ray.shutdown()
    finally:
        leftover += [p for p in ray_processes(exclude=before) if p not in leftover]
        reaped = reap(p for p in leftover if p.is_running())
    return reaped


@contextmanager
def ray_backend(init_args: dict[str, Any], attempts: int = START_ATTEMPTS) -> Iterator[None]:
    """Ray up for one Flower simulation; every Ray process it started is gone afterwards.

    A failed start is cleaned up and retried `attempts` times, then raised as a
    FederationError that carries Ray's own message. Flower's backend shuts Ray down at the
    end of its run as well; shutting down twice is harmless.
    """
    import ray

    if ray.is_initialized():  # a Ray this process started itself (a notebook): Flower runs on it
        yield
        return
    before = descendants()
    args = flower_init_args(init_args)
    for attempt in range(1, attempts + 1):
        try:
            ray.init(**args)
            break
        except TypeError as exc:  # arguments ray.init does not take: retrying cannot help
            _stop_ray(before)
            raise FederationError(f"Flower's Ray backend refused its init_args: {exc}") from exc
        except Exception as exc:  # Ray raises bare Exception/RuntimeError from its node start
            reaped = _stop_ray(before)
            if attempt == attempts:
                raise FederationError(f"Flower's Ray backend failed to start {attempts} times; last error: "
                                      f"{type(exc).__name__}: {exc}") from exc
            log.warning("Ray failed to start (attempt %d of %d: %s); stopped %d of its processes, retrying",
                        attempt, attempts, exc, len(reaped))
            time.sleep(2.0 * attempt)
        except BaseException:  # Ctrl-C during the start: leave nothing running
            _stop_ray(before)
            raise
    try:
        yield
    finally:
        reaped = _stop_ray(before)
        if reaped:
            log.debug("stopped %d Ray processes left after shutdown: %s", len(reaped), sorted(set(reaped)))


class _RunSimulationDeprecation(logging.Filter):
    """Drops the one "DEPRECATED FEATURE" banner Flower 1.41 logs on every `run_simulation` call.

    Flower's supported path (`flwr run` against a local simulation SuperLink) cannot host
    this driver yet: it starts Ray inside its own `flwr-simulation` process (so a failed
    Ray start could no longer be cleaned up and retried, see `ray_backend`), leaves a
    detached SuperLink on fixed ports, and exits 0 when a run fails. Every other Flower
    log line is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("DEPRECATED FEATURE")
                    and any("run_simulation" in str(arg) for arg in (record.args or ())))


FLOWER_LINK_STATE_ENV = "FEDPEFT_FLOWER_LINK_STATE"
"""Set to 1, simulations keep Flower's unindexed in-memory LinkState (a benchmark baseline only)."""


def run_flower_simulation(server_app: Any, client_app: Any, num_supernodes: int, backend_config: dict[str, Any]) -> None:
    """Flower's `run_simulation`, on a Ray backend started (and cleaned up) by `ray_backend`, with
    each node's pending messages indexed (`indexed_link_state`: Flower's poll is O(N²) per pass)."""
    from flwr.simulation import run_simulation

    flower_log = logging.getLogger("flwr")
    if not any(isinstance(f, _RunSimulationDeprecation) for f in flower_log.filters):
        flower_log.addFilter(_RunSimulationDeprecation())
    from fedpeft.simulations.indexed_link_state import indexed_link_state

    # FLOWER_LINK_STATE_ENV=1 keeps Flower's own LinkState: the baseline of `peft-bench-scale --simulate-baseline`
    indexing = nullcontext() if os.environ.get(FLOWER_LINK_STATE_ENV) == "1" else indexed_link_state()
    with ray_backend(dict(backend_config.get("init_args") or {})), indexing:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_supernodes,
                       backend_config=backend_config)
