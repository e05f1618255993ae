"""Open clients' sealed delta envelopes before a round is aggregated.

With `[envelopes] enabled`, clients reply with a signed, encrypted `DeltaEnvelope`
(sealed to the server's X25519 key by their `peft-client` trainer) instead of a
plaintext ArrayRecord: the SuperLink that relays and stores messages cannot read or
alter a delta, and the server knows which registered client produced each one. An
envelope that is truncated, tampered, replayed, sealed to another key, signed by an
unregistered client or for another run/round is rejected with the reason; the round
goes on with the other clients. The reply's metrics (its FedAvg weight among them) are
signed with the envelope, so they cannot be changed in transit either.

The server's private key is loaded by the ServerApp, which Flower runs on the SuperLink's
host: envelopes protect deltas in the SuperLink's messages and state and on the network,
not against a compromised coordinator host.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from flwr.app import Message, RecordDict

from fedpeft.common.errors import ConfigError, DeltaError
from fedpeft.common.protocol.deltas import DeltaSpec
from fedpeft.common.protocol.flower_io import delta_to_arrayrecord
from fedpeft.common.protocol.plan import REPLY_ARRAYS_KEY, REPLY_METRICS_KEY
from fedpeft.common.security.envelope import (
    EnvelopeError,
    PeerIdentity,
    PublicKeys,
    ReplayGuard,
    envelope_size_limit,
    open_delta,
    verify_metrics,
)
from fedpeft.common.wire.envelopes import envelope_from_bytes
from fedpeft.server.robust import RobustSettings, metric_problem

log = logging.getLogger("fedpeft.server")
ENVELOPE_RECORD = "envelope"
SEAL_TO_KEY = "fedpeft-seal-to"
RUN_ID_KEY = "fedpeft-run-id"
METHOD_KEY = "fedpeft-method"


def load_trusted_clients(directory: Path) -> dict[str, bytes]:
    """{client id (key id): Ed25519 public key} from every `*.json` in `directory`."""
    trusted: dict[str, bytes] = {}
    for path in sorted(Path(directory).glob("*.json")):
        try:
            keys = PublicKeys.from_json(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ConfigError) as exc:
            raise ConfigError(f"cannot read client public key file {path}: {exc}") from exc
        trusted[keys.key_id] = keys.ed25519
    if not trusted:
        raise ConfigError(f"no client public keys (*.json) in {directory}")
    return trusted


class EnvelopeOpener:
    """Turns a sealed reply into the plaintext reply the strategy validates, in place."""

    def __init__(self, identity: PeerIdentity, trusted: dict[str, bytes], run_id: str, spec: DeltaSpec,
                 replay_path: Path | None = None, robust: RobustSettings | None = None,
                 spec_of: Callable[[int], DeltaSpec] | None = None) -> None:
        """`spec`: what every reply's sealed delta must be; `spec_of(node id)`, where given,
        the spec of that node's reply (per-node LoRA ranks), which `spec` must bound in size."""
        self.identity = identity
        self.trusted = trusted
        self.run_id = run_id
        self.spec = spec
        self.spec_of = spec_of
        self.robust = robust if robust is not None else RobustSettings()
        self.max_bytes = envelope_size_limit(spec)
        self.guard = ReplayGuard(replay_path)
        # One accepted envelope per client and round, whatever its nonce (a client with
        # two registered nodes must not count twice). Rebuilt from the guard on restart.
        self._accepted: set[tuple[int, str]] = {(k.round, k.client_id) for k in self.guard.keys() if k.run_id == run_id}

    def seal_config(self, method: str) -> dict[str, str]:
        """What clients need in each train config to seal their reply to this server."""
        return {SEAL_TO_KEY: self.identity.public_x25519.hex(), RUN_ID_KEY: self.run_id, METHOD_KEY: method}

    def __call__(self, msg: Message, server_round: int) -> str | None:
        """Replace `msg`'s envelope with its opened delta; the problem if it is refused."""
        content = msg.content
        record = content.config_records.get(ENVELOPE_RECORD)
        if record is None or "envelope" not in record:
            return "reply carries no sealed envelope, but this run requires them"
        data = record["envelope"]
        if not isinstance(data, bytes):
            return "envelope entry is not bytes"
        if set(content.array_records):
            return f"sealed reply also carries plaintext arrays {sorted(content.array_records)}"
        metrics = content.metric_records.get(REPLY_METRICS_KEY)
        if metrics is None:
            return f"sealed reply has no {REPLY_METRICS_KEY!r} record"
        # Typed and bounded before the envelope is opened: a refused reply must not use up its nonce.
        problem = metric_problem(metrics, self.robust)
        if problem:
            return problem
        signature = record.get("metrics-signature")
        try:
            envelope = envelope_from_bytes(data, max_bytes=self.max_bytes)
            if (server_round, envelope.client_id) in self._accepted:
                return (f"envelope rejected (replayed): client {envelope.client_id!r} already delivered an update "
                        f"for round {server_round}")
            delta = open_delta(envelope, recipient=self.identity, trusted_senders=self.trusted, replay_guard=self.guard,
                               expected_spec=self.spec if self.spec_of is None else self.spec_of(msg.metadata.src_node_id),
                               expected_run_id=self.run_id, expected_round=server_round,
                               max_bytes=self.max_bytes)
            if not isinstance(signature, bytes):
                return f"sealed reply from client {envelope.client_id!r} has no metrics signature"
            verify_metrics(envelope, {k: float(v) for k, v in metrics.items()}, signature)  # type: ignore[arg-type]
        except (EnvelopeError, DeltaError) as exc:
            return str(exc)
        self._accepted.add((server_round, envelope.client_id))
        msg.content = RecordDict({REPLY_ARRAYS_KEY: delta_to_arrayrecord(delta), REPLY_METRICS_KEY: metrics})
        log.debug("round %d: opened envelope from client %s", server_round, envelope.client_id)
        return None
