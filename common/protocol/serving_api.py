"""The serving API's plain request/response types (torch-free, no protobuf).

`fedpeft.common.wire.serving` converts them to and from `fedpeft.v1` serving messages;
the engine (`fedpeft.server.serving.engine`) consumes and produces them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

MIN_TEMPERATURE = 0.01
"""Smaller temperatures overflow logits / T to inf; use 0 (greedy) instead."""
_FLOAT32_MIN_TEMPERATURE: float = struct.unpack("<f", struct.pack("<f", MIN_TEMPERATURE))[0]
"""MIN_TEMPERATURE as it arrives over protobuf (a float32 field): the documented minimum must pass."""


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; top_k / top_p 0 = off."""

    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    seed: int = 0

    def problems(self, vocab_size: int) -> list[str]:
        found = []
        if not (self.temperature == 0.0 or _FLOAT32_MIN_TEMPERATURE <= self.temperature <= 100.0):  # NaN fails both
            found.append(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, 100], got {self.temperature}")
        if not (self.top_p == self.top_p and 0.0 <= self.top_p <= 1.0):
            found.append(f"top_p must be in [0, 1], got {self.top_p}")
        if not 0 <= self.top_k <= vocab_size:
            found.append(f"top_k must be in [0, {vocab_size}], got {self.top_k}")
        return found


@dataclass
class GenerateParams:
    adapter_id: str
    version: int
    prompt: str
    max_new_tokens: int = 0
    sampling: Sampling = field(default_factory=Sampling)
    ignore_eos: bool = False


@dataclass
class TokenEvent:
    token_ids: list[int]
    text: str
    done: bool = False
    finish_reason: str = ""


@dataclass
class ScoreResult:
    log_likelihood: list[float]
    num_tokens: list[int]
    adapter_version: int


@dataclass
class AdapterStatus:
    adapter_id: str
    versions: list[int]
    current_version: int
    loaded_versions: list[int]
    method: str
    rank: int
    encrypted: bool


@dataclass
class EngineLimits:
    max_batch: int = 16
    max_queue: int = 256
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 512
    default_max_new_tokens: int = 64
    adapter_memory_bytes: int = 1 << 30
    max_continuations: int = 64
    max_score_tokens: int = 16384
    """Continuations x padded length one Score call may run."""
