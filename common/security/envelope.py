"""Signed, encrypted PEFT delta envelopes: who sent a delta, to whom, for which round.

A delta stored or sent outside SecAgg+ (a personal adapter checkpoint, an upload, the
serving path) travels as an `Envelope`: only the holder of the recipient's X25519 key
can read it, only the sender's Ed25519 key can have produced it, and a `ReplayGuard`
refuses the same (run, round, client, nonce) twice.

Scheme (format version 1), built from `cryptography` primitives only:
  1. the sender draws an ephemeral X25519 key and does ECDH with the recipient's key;
  2. HKDF-SHA256 (salt = ephemeral || recipient public key; info = version, run, round,
     client) derives a one-time AES-256-GCM key;
  3. AES-256-GCM encrypts the delta's safetensors bytes under a random 96-bit nonce,
     with the canonical header (every field except ciphertext and signature) as
     associated data;
  4. Ed25519 signs canonical header || SHA-256(ciphertext) with the sender's key.
The canonical header is a fixed length-prefixed encoding (`canonical_header`), not the
protobuf bytes, which are not canonical. Protobuf conversion lives in
`fedpeft.common.wire`; this module does not import generated code.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedpeft.common.errors import ConfigError, DeltaError
from fedpeft.common.files import atomic_write_bytes
from fedpeft.common.protocol.deltas import DeltaSpec, delta_from_bytes, delta_to_bytes

FORMAT_VERSION = 1
KEY_BYTES = 32  # raw Ed25519 and X25519 public keys
NONCE_BYTES = 12
TAG_BYTES = 16
SIGNATURE_BYTES = 64
DEFAULT_MAX_ENVELOPE_BYTES = 512 * 1024 * 1024
MAX_PROBLEMS_SHOWN = 8
_HEADER_DOMAIN = b"fedpeft.v1.DeltaEnvelope/header\x00"
_SIGNATURE_DOMAIN = b"fedpeft.v1.DeltaEnvelope/signature\x00"
_KDF_DOMAIN = b"fedpeft.v1.DeltaEnvelope/key\x00"
_METRICS_DOMAIN = b"fedpeft.v1.DeltaEnvelope/metrics\x00"
_U64_MAX = 2**64 - 1
_Key = TypeVar("_Key", Ed25519PrivateKey, X25519PrivateKey)

# dtypes a manifest may name (safetensors can carry all of them), by torch name.
DTYPES: Mapping[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    )
}  # fmt: skip


class Rejection(StrEnum):
    """Why an envelope was refused, in the order `open_delta` checks."""

    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    UNTRUSTED_SENDER = "untrusted sender"
    TAMPERED = "tampered"
    WRONG_CONTEXT = "wrong run or round"
    WRONG_RECIPIENT = "wrong recipient"
    DECRYPTION_FAILED = "decryption failed"
    REPLAYED = "replayed"
    MANIFEST_MISMATCH = "manifest mismatch"
    INVALID_DELTA = "invalid delta"


class EnvelopeError(DeltaError):
    """An envelope was refused; `reason` says which check failed, the message says how."""

    def __init__(self, reason: Rejection, detail: str) -> None:
        super().__init__(reason, detail)  # both in args, so the error pickles (Ray, logs)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"envelope rejected ({self.reason.value}): {self.detail}"


class IdentityError(ConfigError):
    """An identity key file is missing, unreadable, of the wrong type or too permissive."""


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype (torch name, e.g. "bfloat16") of one delta tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str


class ReplayKey(NamedTuple):
    """What identifies one accepted envelope: a second one with the same key is a replay."""

    run_id: str
    round: int
    client_id: str
    nonce: bytes


@dataclass(frozen=True)
class Envelope:
    """One sealed delta; the Python form of `fedpeft.v1.DeltaEnvelope`."""

    format_version: int
    run_id: str
    round: int
    client_id: str
    method: str
    manifest: tuple[TensorInfo, ...]
    sender_public_key: bytes
    recipient_public_key: bytes
    ephemeral_public_key: bytes
    nonce: bytes
    ciphertext: bytes = field(repr=False)
    signature: bytes = field(repr=False)

    @property
    def replay_key(self) -> ReplayKey:
        return ReplayKey(self.run_id, self.round, self.client_id, self.nonce)

    @property
    def size(self) -> int:
        """Bytes of payload and header fields: the encoded size minus a little framing."""
        strings = len(self.run_id.encode()) + len(self.client_id.encode()) + len(self.method.encode())
        manifest = sum(len(t.name.encode()) + len(t.dtype) + 8 * len(t.shape) for t in self.manifest)
        keys = len(self.sender_public_key) + len(self.recipient_public_key) + len(self.ephemeral_public_key)
        return strings + manifest + keys + len(self.nonce) + len(self.ciphertext) + len(self.signature)


def key_id(public_key: bytes) -> str:
    """Short, stable fingerprint of a raw public key for logs and error messages."""
    return hashlib.sha256(public_key).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKeys:
    """The shareable half of a `PeerIdentity`: raw Ed25519 (verify) and X25519 (encrypt-to) keys."""

    ed25519: bytes
    x25519: bytes

    @property
    def key_id(self) -> str:
        return key_id(self.ed25519)

    def to_json(self) -> str:
        return json.dumps({"ed25519": self.ed25519.hex(), "x25519": self.x25519.hex()}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PublicKeys:
        try:
            data = json.loads(text)
            keys = cls(bytes.fromhex(data["ed25519"]), bytes.fromhex(data["x25519"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise IdentityError(f"not a public-key JSON object with hex 'ed25519' and 'x25519': {exc}") from exc
        if len(keys.ed25519) != KEY_BYTES or len(keys.x25519) != KEY_BYTES:
            raise IdentityError(f"public keys must be {KEY_BYTES} bytes each")
        return keys


class PeerIdentity:
    """A peer's long-term keys: Ed25519 to sign what it sends, X25519 to receive envelopes."""

    SIGNING_FILE = "ed25519.pem"
    AGREEMENT_FILE = "x25519.pem"
    PUBLIC_FILE = "public.json"

    def __init__(self, signing_key: Ed25519PrivateKey, agreement_key: X25519PrivateKey) -> None:
        self._signing_key = signing_key
        self._agreement_key = agreement_key
        self.public_keys = PublicKeys(
            signing_key.public_key().public_bytes_raw(), agreement_key.public_key().public_bytes_raw()
        )

    @classmethod
    def generate(cls) -> PeerIdentity:
        return cls(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    @property
    def public_ed25519(self) -> bytes:
        return self.public_keys.ed25519

    @property
    def public_x25519(self) -> bytes:
        return self.public_keys.x25519

    def __repr__(self) -> str:  # never print key material
        return f"PeerIdentity(key_id={self.public_keys.key_id})"

    def save(self, directory: Path, *, password: bytes | None = None, overwrite: bool = False) -> None:
        """Write both private keys as PKCS#8 PEM (mode 0600) and public.json; refuses to
        replace an existing identity unless `overwrite`, since that would orphan its peers."""
        directory = Path(directory)
        paths = [directory / self.SIGNING_FILE, directory / self.AGREEMENT_FILE]
        existing = [str(p) for p in paths if p.exists()]
        if existing and not overwrite:
            raise IdentityError(f"identity already exists ({', '.join(existing)}); pass overwrite=True to replace it")
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        )
        for path, key in zip(paths, (self._signing_key, self._agreement_key), strict=True):
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
            atomic_write_bytes(path, pem)  # mkstemp creates the temp file 0600 already
            os.chmod(path, 0o600)
        public = directory / self.PUBLIC_FILE
        atomic_write_bytes(public, (self.public_keys.to_json() + "\n").encode())
        os.chmod(public, 0o644)

    @classmethod
    def load(cls, directory: Path, *, password: bytes | None = None) -> PeerIdentity:
        """Read an identity written by `save`; refuses key files others can read (like ssh)."""
        directory = Path(directory)
        signing = _load_private_key(directory / cls.SIGNING_FILE, password, Ed25519PrivateKey)
        agreement = _load_private_key(directory / cls.AGREEMENT_FILE, password, X25519PrivateKey)
        return cls(signing, agreement)


def _load_private_key(path: Path, password: bytes | None, kind: type[_Key]) -> _Key:
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read identity key {path}: {exc}") from exc
    if os.name == "posix" and mode & 0o077:
        raise IdentityError(f"identity key {path} is accessible by others (mode {mode & 0o777:o}); chmod 600 it")
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"identity key {path} is not a readable PEM private key: {exc}") from exc
    if not isinstance(key, kind):
        raise IdentityError(f"identity key {path} is a {type(key).__name__}, expected {kind.__name__}")
    return key


# --- canonical encoding -------------------------------------------------------------


def _u32(n: int) -> bytes:
    return struct.pack(">I", n)


def _u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def _lp(data: bytes) -> bytes:
    return _u32(len(data)) + data


def _text(value: str) -> bytes:
    return _lp(value.encode("utf-8"))


def canonical_header(envelope: Envelope) -> bytes:
    """Unambiguous bytes of every header field: the AEAD associated data and what is signed."""
    parts = [
        _HEADER_DOMAIN, _u32(envelope.format_version), _text(envelope.run_id), _u64(envelope.round),
        _text(envelope.client_id), _text(envelope.method), _u32(len(envelope.manifest)),
    ]  # fmt: skip
    for info in envelope.manifest:
        parts += [_text(info.name), _u32(len(info.shape)), *(_u64(d) for d in info.shape), _text(info.dtype)]
    parts += [
        _lp(envelope.sender_public_key), _lp(envelope.recipient_public_key),
        _lp(envelope.ephemeral_public_key), _lp(envelope.nonce),
    ]  # fmt: skip
    return b"".join(parts)


def _signed_message(header: bytes, ciphertext: bytes) -> bytes:
    return _SIGNATURE_DOMAIN + header + hashlib.sha256(ciphertext).digest()


def _metrics_message(envelope: Envelope, metrics: Mapping[str, float]) -> bytes:
    body = json.dumps({k: float(v) for k, v in metrics.items()}, sort_keys=True).encode()
    return _METRICS_DOMAIN + _signed_message(canonical_header(envelope), envelope.ciphertext) + _lp(body)


def sign_metrics(envelope: Envelope, metrics: Mapping[str, float], sender: PeerIdentity) -> bytes:
    """Sign a reply's metrics (its FedAvg weight among them) together with `envelope`, so
    nobody between client and server can change one without the other."""
    if envelope.sender_public_key != sender.public_ed25519:
        raise ConfigError("metrics must be signed by the envelope's sender")
    return sender._signing_key.sign(_metrics_message(envelope, metrics))


def verify_metrics(envelope: Envelope, metrics: Mapping[str, float], signature: bytes) -> None:
    """Raise `EnvelopeError(TAMPERED)` unless `signature` is the envelope sender's over
    `metrics` and this very envelope (call after `open_delta` trusted the sender)."""
    try:
        Ed25519PublicKey.from_public_bytes(envelope.sender_public_key).verify(signature, _metrics_message(envelope, metrics))
    except (InvalidSignature, ValueError) as exc:
        raise EnvelopeError(Rejection.TAMPERED, f"reply metrics of client {envelope.client_id!r} are not the ones it "
                            "signed (weight or metrics altered in transit)") from exc


def _derive_key(shared: bytes, envelope: Envelope) -> bytes:
    info = _KDF_DOMAIN + _u32(envelope.format_version) + _text(envelope.run_id)
    info += _u64(envelope.round) + _text(envelope.client_id)
    salt = envelope.ephemeral_public_key + envelope.recipient_public_key
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(shared)


# --- structure -----------------------------------------------------------------------


def envelope_problems(envelope: Envelope, *, sealed: bool = True) -> list[str]:
    """Everything structurally wrong with `envelope` (empty when well formed)."""
    found: list[str] = []
    if envelope.format_version != FORMAT_VERSION:
        found.append(f"unsupported format version {envelope.format_version} (this build reads {FORMAT_VERSION})")
    for name in ("run_id", "client_id", "method"):
        if not getattr(envelope, name):
            found.append(f"{name} is empty")
    if not 0 <= envelope.round <= _U64_MAX:
        found.append(f"round {envelope.round} is out of range")
    seen: set[str] = set()
    for info in envelope.manifest:
        if not info.name or info.name in seen:
            found.append(f"manifest: {'duplicate' if info.name else 'empty'} tensor name {info.name!r}")
        seen.add(info.name)
        if info.dtype not in DTYPES:
            found.append(f"manifest: {info.name}: unsupported dtype {info.dtype!r}")
        if any(not 0 <= d < 2**63 for d in info.shape):
            found.append(f"manifest: {info.name}: invalid shape {info.shape}")
    lengths = {"sender_public_key": KEY_BYTES, "recipient_public_key": KEY_BYTES, "ephemeral_public_key": KEY_BYTES,
               "nonce": NONCE_BYTES}  # fmt: skip
    if sealed:
        lengths["signature"] = SIGNATURE_BYTES
    for name, expected in lengths.items():
        actual = len(getattr(envelope, name))
        if actual != expected:
            found.append(f"{name} has {actual} bytes, expected {expected}")
    if sealed and len(envelope.ciphertext) < TAG_BYTES:
        found.append(f"ciphertext has {len(envelope.ciphertext)} bytes, shorter than the {TAG_BYTES}-byte tag")
    return found


def check_envelope(envelope: Envelope, *, sealed: bool = True) -> None:
    """Raise `EnvelopeError(MALFORMED)` listing every structural problem of `envelope`."""
    found = envelope_problems(envelope, sealed=sealed)
    if found:
        raise EnvelopeError(Rejection.MALFORMED, _joined(found))


def _joined(found: list[str]) -> str:
    more = f" (+{len(found) - MAX_PROBLEMS_SHOWN} more)" if len(found) > MAX_PROBLEMS_SHOWN else ""
    return "; ".join(found[:MAX_PROBLEMS_SHOWN]) + more


def manifest_of(delta: Mapping[str, torch.Tensor]) -> tuple[TensorInfo, ...]:
    """The manifest that describes `delta`, in its order."""
    return tuple(TensorInfo(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in delta.items())


def envelope_size_limit(spec: DeltaSpec, slack: int = 64 * 1024) -> int:
    """A `max_bytes` that fits any valid envelope for `spec` and little else."""
    per_tensor = sum(3 * len(name) + 256 for name in spec.tensors)  # manifest + safetensors header
    return spec.num_bytes + per_tensor + slack


# --- seal / open ---------------------------------------------------------------------


def seal_delta(
    delta: Mapping[str, torch.Tensor],
    *,
    run_id: str,
    round: int,
    client_id: str,
    method: str,
    sender: PeerIdentity,
    recipient_public_x25519: bytes | X25519PublicKey,
) -> Envelope:
    """Encrypt `delta` so only the recipient can read it, and sign it as `sender`."""
    recipient_raw = (
        recipient_public_x25519.public_bytes_raw()
        if isinstance(recipient_public_x25519, X25519PublicKey)
        else bytes(recipient_public_x25519)
    )
    ephemeral = X25519PrivateKey.generate()
    unsealed = Envelope(
        FORMAT_VERSION, run_id, round, client_id, method, manifest_of(delta), sender.public_ed25519,
        recipient_raw, ephemeral.public_key().public_bytes_raw(), os.urandom(NONCE_BYTES), b"", b"",
    )  # fmt: skip
    check_envelope(unsealed, sealed=False)
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient_raw))
    except ValueError as exc:  # e.g. a low-order point: no usable shared secret
        raise EnvelopeError(Rejection.MALFORMED, f"recipient X25519 key is unusable: {exc}") from exc
    header = canonical_header(unsealed)
    ciphertext = AESGCM(_derive_key(shared, unsealed)).encrypt(unsealed.nonce, delta_to_bytes(delta), header)
    signature = sender._signing_key.sign(_signed_message(header, ciphertext))
    return replace(unsealed, ciphertext=ciphertext, signature=signature)


def open_delta(
    envelope: Envelope,
    *,
    recipient: PeerIdentity,
    trusted_senders: Mapping[str, bytes | Ed25519PublicKey],
    replay_guard: ReplayGuard | None,
    expected_spec: DeltaSpec | None = None,
    expected_run_id: str | None = None,
    expected_round: int | None = None,
    max_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES,
) -> OrderedDict[str, torch.Tensor]:
    """Verify, decrypt and validate `envelope`; return its delta in manifest order.

    `trusted_senders` maps each client id to the Ed25519 key it must sign with, so one
    trusted client cannot pose as another. `replay_guard=None` only for data at rest
    that may legitimately be read twice (checkpoints). Checks run cheapest and
    least-trusting first; the first failure raises `EnvelopeError` with its `Rejection`.
    The replay key is remembered only once every check has passed.
    """
    who = f"envelope from client {envelope.client_id!r} (run {envelope.run_id!r}, round {envelope.round})"
    if envelope.size > max_bytes:
        raise EnvelopeError(Rejection.OVERSIZED, f"{who} has {envelope.size} bytes, limit {max_bytes}")
    check_envelope(envelope)
    registered = trusted_senders.get(envelope.client_id)
    sender_id = key_id(envelope.sender_public_key)
    if registered is None:
        raise EnvelopeError(Rejection.UNTRUSTED_SENDER, f"{who}: client is not a trusted sender (key id {sender_id})")
    registered_raw = registered.public_bytes_raw() if isinstance(registered, Ed25519PublicKey) else bytes(registered)
    if registered_raw != envelope.sender_public_key:
        raise EnvelopeError(
            Rejection.UNTRUSTED_SENDER,
            f"{who}: signed with key id {sender_id}, but the client is registered with {key_id(registered_raw)}",
        )
    header = canonical_header(envelope)
    try:
        Ed25519PublicKey.from_public_bytes(envelope.sender_public_key).verify(
            envelope.signature, _signed_message(header, envelope.ciphertext)
        )
    except (InvalidSignature, ValueError) as exc:
        raise EnvelopeError(Rejection.TAMPERED, f"{who}: signature does not verify (key id {sender_id})") from exc
    if (expected_run_id is not None and envelope.run_id != expected_run_id) or (
        expected_round is not None and envelope.round != expected_round
    ):
        raise EnvelopeError(Rejection.WRONG_CONTEXT, f"{who}: expected run {expected_run_id!r}, round {expected_round}")
    if envelope.recipient_public_key != recipient.public_x25519:
        raise EnvelopeError(
            Rejection.WRONG_RECIPIENT,
            f"{who} is encrypted to X25519 key id {key_id(envelope.recipient_public_key)}, "
            f"not to this recipient's {key_id(recipient.public_x25519)}",
        )
    try:
        shared = recipient._agreement_key.exchange(X25519PublicKey.from_public_bytes(envelope.ephemeral_public_key))
        plaintext = AESGCM(_derive_key(shared, envelope)).decrypt(envelope.nonce, envelope.ciphertext, header)
    except (InvalidTag, ValueError) as exc:
        raise EnvelopeError(Rejection.DECRYPTION_FAILED, f"{who}: authenticated decryption failed") from exc
    if replay_guard is not None and envelope.replay_key in replay_guard:
        raise EnvelopeError(Rejection.REPLAYED, f"{who}: nonce {envelope.nonce.hex()} was accepted before")
    delta = _match_manifest(envelope, plaintext, who)
    if expected_spec is not None:
        try:
            expected_spec.validate(delta, source=who)
        except DeltaError as exc:
            raise EnvelopeError(Rejection.INVALID_DELTA, str(exc)) from exc
    if replay_guard is not None and not replay_guard.add(envelope.replay_key):
        raise EnvelopeError(Rejection.REPLAYED, f"{who}: nonce {envelope.nonce.hex()} was accepted concurrently")
    return delta


def _match_manifest(envelope: Envelope, plaintext: bytes, who: str) -> OrderedDict[str, torch.Tensor]:
    try:
        tensors = delta_from_bytes(plaintext)
    except DeltaError as exc:
        raise EnvelopeError(Rejection.MANIFEST_MISMATCH, f"{who}: decrypted payload is not safetensors: {exc}") from exc
    found: list[str] = []
    listed = {info.name: info for info in envelope.manifest}
    found += [f"{name}: in the payload but not in the manifest" for name in tensors if name not in listed]
    for name, info in listed.items():
        tensor = tensors.get(name)
        if tensor is None:
            found.append(f"{name}: in the manifest but not in the payload")
        elif tuple(tensor.shape) != info.shape or tensor.dtype != DTYPES[info.dtype]:
            found.append(f"{name}: payload {tuple(tensor.shape)} {tensor.dtype} != manifest {info.shape} {info.dtype}")
    if found:
        raise EnvelopeError(Rejection.MANIFEST_MISMATCH, f"{who}: {_joined(found)}")
    return OrderedDict((info.name, tensors[info.name]) for info in envelope.manifest)


# --- replay protection ---------------------------------------------------------------


class ReplayGuard:
    """Remembers accepted (run, round, client, nonce) keys; with `path`, across restarts.

    Every accepted key is persisted atomically before `add` returns, so a crash never
    forgets an accepted envelope. An unreadable file is an error, never a silent reset,
    which would re-open the door to replays.
    """

    FORMAT = "fedpeft.replay-guard/1"

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._seen: set[ReplayKey] = set()
        if self.path is not None and self.path.exists():
            self._seen = set(_read_guard(self.path))

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._seen

    def keys(self) -> set[ReplayKey]:
        """Every accepted key (a copy)."""
        with self._lock:
            return set(self._seen)

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, key: ReplayKey) -> bool:
        """Remember `key`; False (and nothing changes) when it was already there."""
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
            try:
                self._persist()
            except BaseException:
                self._seen.discard(key)
                raise
            return True

    def _persist(self) -> None:
        if self.path is None:
            return
        rows = sorted([k.run_id, k.round, k.client_id, k.nonce.hex()] for k in self._seen)
        atomic_write_bytes(self.path, json.dumps({"format": self.FORMAT, "seen": rows}).encode())


def _read_guard(path: Path) -> Iterable[ReplayKey]:
    try:
        data = json.loads(path.read_bytes())
        if data.get("format") != ReplayGuard.FORMAT:
            raise ValueError(f"format {data.get('format')!r} is not {ReplayGuard.FORMAT!r}")
        return [ReplayKey(str(r), int(n), str(c), bytes.fromhex(h)) for r, n, c, h in data["seen"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"replay guard file {path} is unreadable ({exc}); refusing to start without it") from exc
