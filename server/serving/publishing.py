"""Closing the loop from training to serving: every finished round publishes a version."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.common.errors import ConfigError
from fedpeft.common.model.adapted import AdaptedModel
from fedpeft.server.serving.registry import check_adapter_id

log = logging.getLogger("fedpeft.server")


@dataclass(frozen=True)
class RegistryTarget:
    """Where a federation publishes its global adapter after every round."""

    registry_dir: str
    adapter_id: str
    keys_dir: str | None = None
    """Registry identity (`peft-server keys`): versions are sealed at rest with it."""

    def check(self, method_peft_backed: bool) -> None:
        check_adapter_id(self.adapter_id)
        if not method_peft_backed:
            raise ConfigError("publishing to an adapter registry needs a peft-backed method (stock PEFT adapter dirs)")
        if self.keys_dir is not None and not Path(self.keys_dir).is_dir():
            raise ConfigError(f"registry keys dir {self.keys_dir} does not exist (make it with `peft-server keys`)")


def publish_round(adapted: AdaptedModel, target: RegistryTarget, server_round: int, metrics: Mapping[str, Any]) -> int:
    """Save the model's current adapter as the next registry version; returns the version."""
    from fedpeft.common.model.base_model import model_fingerprint
    from fedpeft.server.serving.launch import open_registry

    registry = open_registry(Path(target.registry_dir), Path(target.keys_dir) if target.keys_dir else None)
    with tempfile.TemporaryDirectory(prefix="fedpeft-publish-") as tmp:
        adapted.save_adapter(Path(tmp))
        version = registry.publish(target.adapter_id, Path(tmp), {
            "round": server_round, "method": adapted.method.name,
            "base_model_fingerprint": model_fingerprint(adapted.model_dir),
            **{k: v for k, v in metrics.items() if isinstance(v, int | float | str)},
        })
    log.info("published %s version %d (round %d) to %s", target.adapter_id, version, server_round, target.registry_dir)
    return version
