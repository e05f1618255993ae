"""Export the final global adapter as a stock PEFT adapter dir plus fedpeft.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedpeft.common import __version__
from fedpeft.common.files import write_json_atomic
from fedpeft.common.model.adapted import AdaptedModel

MANIFEST_FILE = "fedpeft.json"


def export_adapter(adapted: AdaptedModel, out_dir: Path, base_model: str, extra: dict[str, Any]) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (stock peft for
    peft-backed methods) and a manifest naming the base model and method."""
    out_dir.mkdir(parents=True, exist_ok=True)
    adapted.save_adapter(out_dir)
    manifest = {
        "fedpeft_version": __version__,
        "base_model": base_model,
        "base_model_dir": str(adapted.model_dir),
        "method": adapted.method.name,
        "method_options": adapted.config.to_dict(),
        "peft_backed": adapted.method.peft_backed,
        "quantize": adapted.quantize,
        "trainable_parameters": adapted.spec.num_parameters,
        **extra,
    }
    write_json_atomic(out_dir / MANIFEST_FILE, manifest)
    return out_dir
