"""Shared fixtures: a tiny random Llama built locally (no hub), offline environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpeft.common.logs import apply_offline_env

apply_offline_env()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory):
    """A private model cache for the tests that convert the built-in SmolLM2 (once)."""
    import os

    previous = os.environ.get("FEDPEFT_CACHE")
    os.environ["FEDPEFT_CACHE"] = str(tmp_path_factory.mktemp("fedpeft-cache"))
    yield Path(os.environ["FEDPEFT_CACHE"])
    if previous is None:
        os.environ.pop("FEDPEFT_CACHE", None)
    else:
        os.environ["FEDPEFT_CACHE"] = previous


@pytest.fixture()
def flower_task_identity():
    """Flower messages need a task identity; a run sets it, unit tests set a dummy one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 0
    return TaskIdentity


@pytest.hookimpl(trylast=True)  # after pytest's own: fixtures are torn down by then
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No process a test started may outlive the session: a leftover Ray raylet or peft-client
    would keep CI's output pipe open long after pytest has reported."""
    import sys

    from fedpeft.simulations.ray_runtime import descendants, reap

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()
    reaped = reap(descendants())
    if reaped:
        session.config.get_terminal_writer().line(f"conftest: stopped {len(reaped)} leftover processes: "
                                                  f"{', '.join(sorted(set(reaped)))}", yellow=True)
