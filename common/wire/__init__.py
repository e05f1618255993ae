"""The one serde boundary for generated protobuf code: every `_pb2` import lives here.

- `envelopes`: `Envelope` <-> `fedpeft.v1.DeltaEnvelope` (needs torch, via deltas);
- `trainer`: Flower arrays <-> `fedpeft.v1.LocalTrainer` messages (torch-free, so
  Flower's short-lived ClientApp process can use it without importing torch).

The envelope helpers are re-exported lazily (PEP 562) so that importing
`fedpeft.common.wire.trainer` does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_ENVELOPE_NAMES = frozenset({"envelope_to_proto", "envelope_from_proto", "envelope_to_bytes", "envelope_from_bytes",
                             "write_envelope_file", "read_envelope_file"})


def __getattr__(name: str) -> Any:
    if name in _ENVELOPE_NAMES:
        return getattr(importlib.import_module("fedpeft.common.wire.envelopes"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_ENVELOPE_NAMES)
