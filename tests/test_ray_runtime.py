"""Flower's Ray backend: a failed start is cleaned up and retried; nothing of Ray outlives a run."""

from __future__ import annotations

import os
import subprocess
import sys
from itertools import chain, repeat

import pytest

from fedpeft.common.errors import FederationError
from fedpeft.simulations import ray_runtime


def _orphaning_failure(spawned: list[subprocess.Popen]):
    """A `ray.init` stand-in that fails the way a slow raylet start does: a Ray process left behind."""
    import ray

    fake_raylet = os.path.join(os.path.dirname(ray.__file__), "core", "src", "ray", "raylet", "raylet")

    def fail(**_kwargs):
        spawned.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", fake_raylet]))
        raise Exception("The current node timed out during startup.")

    return fail


@pytest.mark.slow
def test_a_failed_ray_start_is_reaped_and_retried_and_the_run_leaves_no_ray_process(monkeypatch):
    import ray

    spawned: list[subprocess.Popen] = []
    real_init = ray.init
    calls = chain([_orphaning_failure(spawned)], repeat(real_init))
    monkeypatch.setattr(ray, "init", lambda **kw: next(calls)(**kw))
    monkeypatch.setattr(ray_runtime.time, "sleep", lambda _s: None)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # not Ray's: left alone
    try:
        with ray_runtime.ray_backend({"include_dashboard": False}):
            assert ray.is_initialized()
            assert spawned[0].poll() is not None  # the failed start's process is gone before the retry
            assert any(p.name() in ray_runtime.RAY_BINARIES for p in ray_runtime.ray_processes())
        assert not ray.is_initialized()
        assert ray_runtime.ray_processes() == []  # no gcs_server, raylet, worker or agent left running
        assert bystander.poll() is None
    finally:
        bystander.kill()


def test_a_ray_that_never_starts_is_a_federation_error_with_rays_message(monkeypatch):
    import ray

    spawned: list[subprocess.Popen] = []
    monkeypatch.setattr(ray, "init", _orphaning_failure(spawned))
    monkeypatch.setattr(ray_runtime.time, "sleep", lambda _s: None)
    with pytest.raises(FederationError, match="failed to start 3 times.*timed out during startup"):
        with ray_runtime.ray_backend({}):
            pytest.fail("the body must not run without Ray")
    assert len(spawned) == 3 and all(p.poll() is not None for p in spawned)


def test_init_args_are_flowers():
    args = ray_runtime.flower_init_args({"include-dashboard": False, "num_cpus": 2})
    assert args["include_dashboard"] is False and args["num_cpus"] == 2
    assert args["logging_level"] == "WARNING" and args["log_to_driver"] is True  # run_simulation's defaults
    assert args["runtime_env"]["env_vars"]["PYTHONPATH"] == os.environ["PYTHONPATH"]
    with pytest.raises(FederationError, match="runtime_env"):
        ray_runtime.flower_init_args({"runtime_env": {}})
