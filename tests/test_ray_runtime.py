"""Flower's Ray backend: a failed start is cleaned up and retried; nothing outlives a run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedpeft.common.errors import FederationError
from fedpeft.simulations import ray_runtime


def _orphaning_failure(spawned: list[subprocess.Popen]):
    """A `ray.init` stand-in that fails the way a slow raylet start does: processes left behind."""

    def fail(**_kwargs):
        spawned.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]))
        raise Exception("The current node timed out during startup.")

    return fail


def test_a_failed_ray_start_is_reaped_and_retried_and_the_run_leaves_no_process(monkeypatch):
    import ray

    spawned: list[subprocess.Popen] = []
    real_init = ray.init
    calls = iter([_orphaning_failure(spawned), real_init])
    monkeypatch.setattr(ray, "init", lambda **kw: next(calls)(**kw))
    monkeypatch.setattr(ray_runtime.time, "sleep", lambda _s: None)
    before = set(ray_runtime._descendants())

    with ray_runtime.ray_backend({"include_dashboard": False}):
        assert ray.is_initialized()
        assert spawned[0].poll() is not None  # the failed start's process is gone before the retry
        assert any(p.name() in {"raylet", "gcs_server"} for p in ray_runtime._descendants().values())

    assert not ray.is_initialized()
    assert set(ray_runtime._descendants()) <= before  # no gcs_server, raylet or worker left running


def test_a_ray_that_never_starts_is_a_federation_error_with_rays_message(monkeypatch):
    import ray

    spawned: list[subprocess.Popen] = []
    monkeypatch.setattr(ray, "init", _orphaning_failure(spawned))
    monkeypatch.setattr(ray_runtime.time, "sleep", lambda _s: None)
    with pytest.raises(FederationError, match="failed to start 3 times.*timed out during startup"):
        with ray_runtime.ray_backend({}):
            pytest.fail("the body must not run without Ray")
    assert len(spawned) == 3 and all(p.poll() is not None for p in spawned)
