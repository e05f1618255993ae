"""The gRPC `AdapterServing` service of `peft-server serve`: auth, status codes, streaming.

Every `ServingError` the engine or registry raises becomes the RPC status it names
(NOT_FOUND, INVALID_ARGUMENT, DATA_LOSS, ...) with its message; the server keeps
serving everyone else. Oversized requests are refused by gRPC itself
(RESOURCE_EXHAUSTED) through `grpc.max_receive_message_length`. Health is the standard
`grpc.health.v1` service from `grpcio-health-checking`.

Tenant auth (optional, `--tokens FILE`): each call carries `authorization: Bearer
<token>`; the file stores only SHA-256 digests of tokens, each with the adapter ids it
may use (`"*"` = all) and whether it is an operator (`admin`): only operators may
LoadAdapter (pin), UnloadAdapter and Rollback, which act for every tenant. Without a
tokens file there is no auth at all (loopback/lab use). Run it over TLS (`--tls DIR`)
so tokens are not sent in clear.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedpeft.common.errors import ConfigError, FedPeftError
from fedpeft.common.files import write_json_atomic
from fedpeft.common.security.pki import TlsFiles
from fedpeft.common.wire import serving as wire
from fedpeft.server.serving.engine import ServingEngine
from fedpeft.server.serving.errors import PermissionDeniedError, ServingError, UnauthenticatedError

log = logging.getLogger("fedpeft.serving")
T = TypeVar("T")
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
TOKEN_PREFIX = "fpt_"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class TenantTokens:
    """{sha256(token): (tenant, allowed adapter ids)}; empty = auth off."""

    tenants: dict[str, tuple[str, frozenset[str], bool]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> TenantTokens:
        try:
            data = json.loads(Path(path).read_text())
            entries = {t["token_sha256"]: (name, frozenset(t["adapters"]), t.get("admin") is True)
                       for name, t in data["tenants"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"tokens file {path} is unreadable: {exc} (make it with `peft-server token`)") from exc
        if not entries:
            raise ConfigError(f"tokens file {path} has no tenants")
        return cls(entries)

    @staticmethod
    def add(path: Path, tenant: str, adapters: list[str], admin: bool = False) -> str:
        """Create a random token for `tenant` in `path`; returns it (shown once, stored hashed)."""
        data = json.loads(Path(path).read_text()) if Path(path).is_file() else {"tenants": {}}
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)  # the prefix: never starts with "-" on a command line
        data["tenants"][tenant] = {"token_sha256": _digest(token), "adapters": sorted(adapters), "admin": admin}
        write_json_atomic(Path(path), data)
        return token

    def check_admin(self, metadata: dict[str, str], adapter_id: str) -> None:
        """Operators only (when auth is on): the call changes what every tenant gets."""
        tenant = self.check(metadata, adapter_id)
        if tenant is not None and not self.tenants[_digest(metadata["authorization"].removeprefix("Bearer ").strip())][2]:
            raise PermissionDeniedError(f"tenant {tenant!r} is not an operator: LoadAdapter, UnloadAdapter and "
                                        "Rollback need a token made with `peft-server token --admin`")

    def check(self, metadata: dict[str, str], adapter_id: str | None) -> str | None:
        """The tenant name (None when auth is off); raises when not allowed."""
        if not self.tenants:
            return None
        header = metadata.get("authorization", "")
        if not header.startswith("Bearer "):
            raise UnauthenticatedError("missing 'authorization: Bearer <token>' metadata")
        digest = _digest(header.removeprefix("Bearer ").strip())
        match = next((v for k, v in self.tenants.items() if hmac.compare_digest(k, digest)), None)
        if match is None:
            raise UnauthenticatedError("unknown token")
        tenant, allowed, _ = match
        if adapter_id is not None and "*" not in allowed and adapter_id not in allowed:
            raise PermissionDeniedError(f"tenant {tenant!r} may not use adapter {adapter_id!r}")
        return tenant

    def allows(self, metadata: dict[str, str], adapter_id: str) -> bool:
        try:
            self.check(metadata, adapter_id)
            return True
        except ServingError:
            return False


class AdapterServingService(wire.servicer_base()):  # type: ignore[misc]
    """gRPC AdapterServing over one `ServingEngine`."""

    def __init__(self, engine: ServingEngine, tokens: TenantTokens | None = None, request_timeout: float = 600.0) -> None:
        self.engine = engine
        self.tokens = tokens or TenantTokens()
        self.request_timeout = request_timeout

    def _guard(self, context: grpc.ServicerContext, adapter_id: str | None, fn: Callable[[], T],
               admin: bool = False) -> T:
        try:
            metadata = dict(context.invocation_metadata())
            if admin:
                self.tokens.check_admin(metadata, adapter_id or "")
            else:
                self.tokens.check(metadata, adapter_id)
            return fn()
        except ServingError as exc:
            context.abort(getattr(grpc.StatusCode, exc.status), str(exc))
        except FedPeftError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        raise AssertionError("unreachable")  # context.abort raises

    def Generate(self, request, context):  # noqa: N802 (gRPC method names)
        params = wire.generate_params(request)

        def run():
            job = self.engine.submit(params)
            context.add_callback(job.cancelled.set)
            ids, reason = [], ""
            for event in job.stream(self.request_timeout):
                ids += event.token_ids
                reason = event.finish_reason or reason
            text = self.engine.tokenizer.decode(ids, skip_special_tokens=True)
            return wire.generate_response(ids, text, reason, job.version, len(job.prompt_ids))

        return self._guard(context, params.adapter_id or None, run)

    def GenerateStream(self, request, context):  # noqa: N802
        params = wire.generate_params(request)
        job = self._guard(context, params.adapter_id or None, lambda: self.engine.submit(params))
        context.add_callback(job.cancelled.set)
        events: Iterator = job.stream(self.request_timeout)
        while True:
            event = self._guard(context, None, lambda: next(events, None))
            if event is None:
                return
            yield wire.generate_chunk(event, job.version)

    def Score(self, request, context):  # noqa: N802
        ref = request.adapter
        return self._guard(context, ref.adapter_id or None, lambda: wire.score_response(
            self.engine.score(ref.adapter_id, ref.version, request.prompt, list(request.continuations))))

    def ListAdapters(self, request, context):  # noqa: N802
        metadata = dict(context.invocation_metadata())

        def run():
            visible = [s for s in self.engine.adapters() if self.tokens.allows(metadata, s.adapter_id)]
            return wire.list_response(visible, self.engine.base_name, self.engine.adapter_memory,
                                      self.engine.limits.adapter_memory_bytes)

        return self._guard(context, None, run)

    def LoadAdapter(self, request, context):  # noqa: N802
        ref = request.adapter
        return self._guard(context, ref.adapter_id,
                           lambda: wire.adapter_info(self.engine.load(ref.adapter_id, ref.version)), admin=True)

    def UnloadAdapter(self, request, context):  # noqa: N802
        ref = request.adapter
        return self._guard(context, ref.adapter_id,
                           lambda: wire.unload_response(self.engine.unload(ref.adapter_id, ref.version)), admin=True)

    def Rollback(self, request, context):  # noqa: N802
        return self._guard(context, request.adapter_id,
                           lambda: wire.adapter_info(self.engine.rollback(request.adapter_id, request.version)), admin=True)


@dataclass
class ServerHandle:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    stopped: threading.Event = field(default_factory=threading.Event)

    def stop(self, grace: float = 5.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.stopped.set()


def start_grpc_server(engine: ServingEngine, address: str = "127.0.0.1:0", tls_dir: Path | None = None,
                      tokens: TenantTokens | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                      workers: int = 32) -> ServerHandle:
    """Serve `engine` on `address` (port 0 = any free port); TLS when `tls_dir` is given."""
    options = [("grpc.max_receive_message_length", max_request_bytes), ("grpc.max_send_message_length", 64 << 20)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedpeft-rpc"),
                         options=options)
    wire.add_serving_servicer(AdapterServingService(engine, tokens), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if tls_dir is not None:
        files = TlsFiles.in_dir(tls_dir)
        files.check()
        credentials = grpc.ssl_server_credentials([(files.server_key.read_bytes(), files.server_cert.read_bytes())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise ConfigError(f"cannot bind the serving port at {address}")
    server.start()
    for name in ("", wire.SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving on port %d (%s)", port, "TLS" if tls_dir else "plaintext")
    return ServerHandle(server, port, health_servicer)


def channel_to(address: str, ca_cert: Path | None = None) -> grpc.Channel:
    """A client channel (TLS when `ca_cert` is given) with a message cap matching the server's replies."""
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 64 << 20)]
    if ca_cert is not None:
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(ca_cert).read_bytes()), options)
    return grpc.insecure_channel(address, options)
