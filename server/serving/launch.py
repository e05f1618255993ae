"""`peft-server serve`: load the base model once, open the registry, serve until stopped."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from fedpeft.common.errors import ConfigError
from fedpeft.common.protocol.serving_api import EngineLimits
from fedpeft.server.serving.engine import ServingEngine
from fedpeft.server.serving.registry import AdapterRegistry
from fedpeft.server.serving.service import DEFAULT_MAX_REQUEST_BYTES, TenantTokens, start_grpc_server

log = logging.getLogger("fedpeft.serving")


@dataclass
class ServeOptions:
    model: str | None
    registry_dir: Path
    quantize: str = "none"
    keys_dir: Path | None = None
    """The registry's identity (`peft-server keys`): versions are sealed to it at rest."""
    host: str = "127.0.0.1"
    port: int = 9300
    tls_dir: Path | None = None
    tokens_file: Path | None = None
    limits: EngineLimits | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    poll_seconds: float = 1.0


def open_registry(registry_dir: Path, keys_dir: Path | None) -> AdapterRegistry:
    """The registry, sealed at rest with the identity in `keys_dir` when given."""
    identity = None
    if keys_dir is not None:
        from fedpeft.common.security.envelope import PeerIdentity

        identity = PeerIdentity.load(keys_dir)
    return AdapterRegistry(registry_dir, identity=identity)


def build_engine(options: ServeOptions) -> ServingEngine:
    from fedpeft.common.model.base_model import (
        load_base_model,
        load_tokenizer,
        model_fingerprint,
        model_kind,
        resolve_model_dir,
    )
    from fedpeft.common.model.quantization import resolve_quantize

    model_dir = resolve_model_dir(options.model)
    if model_kind(model_dir) != "causal-lm":
        raise ConfigError(f"{model_dir} is not a causal language model; serving generates text")
    quantize = resolve_quantize(options.quantize)
    model = load_base_model(model_dir, quantize)
    tokenizer = load_tokenizer(model_dir)
    registry = open_registry(options.registry_dir, options.keys_dir)
    return ServingEngine(model, tokenizer, registry, options.limits, options.poll_seconds,
                         base_name=options.model or model_dir.name, base_fingerprint=model_fingerprint(model_dir))


def serve(options: ServeOptions, ready: threading.Event | None = None) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests get a grace period."""
    tokens = TenantTokens.load(options.tokens_file) if options.tokens_file else None
    if options.tls_dir is None:
        log.warning("serving WITHOUT TLS on %s:%d: use only on loopback or a trusted network", options.host, options.port)
        if tokens is not None:
            log.warning("tenant tokens travel in clear without TLS: anyone on the path can reuse them")
    engine = build_engine(options).start()
    handle = start_grpc_server(engine, f"{options.host}:{options.port}", options.tls_dir, tokens,
                               options.max_request_bytes)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(f"serving {engine.base_name} with adapters from {options.registry_dir} on {options.host}:{handle.port}",
          flush=True)
    if ready is not None:
        ready.set()
    done.wait()
    log.info("shutting down")
    handle.stop()
    engine.stop()
