"""A directory of versioned adapters: what training publishes and serving loads.

Layout (one directory per adapter id, one per version, a pointer for "latest"):

    <root>/<adapter_id>/v000001/adapter_config.json        stock PEFT dir (plaintext)
                               /adapter_model.safetensors
                               /registry.json               sha256 of both + metadata
    <root>/<adapter_id>/v000002/adapter_model.envelope     sealed (a key is configured)
                               /registry.json
    <root>/<adapter_id>/CURRENT                            "2": the version "latest" means

Publishing writes a version into a temporary directory and renames it into place, then
moves CURRENT atomically: a reader sees either the old or the new version, never half.
Rollback only moves CURRENT.

Integrity: plaintext versions are checked against the sha256s in registry.json
(catches corruption and careless edits, not an attacker who can rewrite registry.json
too). With a key, the weights *and* the adapter config are sealed in a `DeltaEnvelope`
(fedpeft.common.security.envelope: AES-GCM to the registry's X25519 key, Ed25519-signed by the
publisher): nothing can be read or altered without the keys.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fedpeft.common.errors import ConfigError, DeltaError
from fedpeft.common.files import atomic_write_bytes, write_json_atomic
from fedpeft.common.security.envelope import EnvelopeError, PeerIdentity, open_delta, seal_delta
from fedpeft.server.serving.errors import AdapterCorruptError, AdapterNotFoundError, ServingError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SEALED_WEIGHTS = "adapter_model.envelope"
VERSION_META = "registry.json"
CURRENT = "CURRENT"
CONFIG_TENSOR = "__fedpeft_adapter_config__"
"""Sealed versions carry adapter_config.json as a uint8 tensor, so it is authenticated too."""
PUBLISHER_ID = "registry-publisher"
_ADAPTER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class StoredAdapter:
    """One version read back from the registry (verified)."""

    adapter_id: str
    version: int
    config: dict[str, Any]
    tensors: OrderedDict[str, torch.Tensor]
    meta: dict[str, Any]

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def check_adapter_id(adapter_id: str) -> str:
    """Adapter ids become directory names: letters, digits, '.', '_', '-' (max 64)."""
    if not isinstance(adapter_id, str) or not _ADAPTER_ID.match(adapter_id):
        raise ConfigError(f"adapter id {adapter_id!r} must match {_ADAPTER_ID.pattern}")
    return adapter_id


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version_dir_name(version: int) -> str:
    return f"v{version:06d}"


class AdapterRegistry:
    """Versioned adapters under `root`; sealed at rest when `identity` is given.

    `identity` is the registry's key pair: versions are sealed to its X25519 key and
    signed with its Ed25519 key (the coordinator publishes and serves with the same
    identity). `trusted_publishers` adds other publishers' Ed25519 keys by id.
    """

    def __init__(self, root: Path, identity: PeerIdentity | None = None,
                 trusted_publishers: Mapping[str, bytes] | None = None) -> None:
        self.root = Path(root)
        self.identity = identity
        self.trusted: dict[str, bytes] = dict(trusted_publishers or {})
        if identity is not None:
            self.trusted.setdefault(PUBLISHER_ID, identity.public_ed25519)

    # --- reading ---------------------------------------------------------------------

    def adapter_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _ADAPTER_ID.match(p.name)
                      and (p / CURRENT).is_file())

    def versions(self, adapter_id: str) -> list[int]:
        base = self._adapter_dir(adapter_id)
        found = []
        for path in base.glob("v[0-9]*"):
            if path.is_dir() and path.name[1:].isdigit() and (path / VERSION_META).is_file():
                found.append(int(path.name[1:]))
        return sorted(found)

    def current(self, adapter_id: str) -> int:
        """The version "latest" means."""
        path = self._adapter_dir(adapter_id) / CURRENT
        try:
            return int(path.read_text().strip())
        except FileNotFoundError:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not in the registry at {self.root}") from None
        except ValueError as exc:
            raise AdapterCorruptError(f"{path} does not hold a version number") from exc

    def resolve(self, adapter_id: str, version: int = 0) -> int:
        """`version`, or the current one for 0; NOT_FOUND when it does not exist."""
        if version == 0:
            version = self.current(adapter_id)
        if not (self._adapter_dir(adapter_id) / _version_dir_name(version) / VERSION_META).is_file():
            known = self.versions(adapter_id)
            raise AdapterNotFoundError(f"adapter {adapter_id!r} has no version {version} (versions: {known})")
        return version

    def meta(self, adapter_id: str, version: int) -> dict[str, Any]:
        path = self._version_dir(adapter_id, version) / VERSION_META
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise AdapterCorruptError(f"{path} is unreadable: {exc}") from exc
        if not isinstance(meta, dict):
            raise AdapterCorruptError(f"{path} does not hold a JSON object")
        return meta

    def read(self, adapter_id: str, version: int = 0) -> StoredAdapter:
        """Load and verify one version; DATA_LOSS errors name the file and the check."""
        version = self.resolve(adapter_id, version)
        vdir = self._version_dir(adapter_id, version)
        meta = self.meta(adapter_id, version)
        where = f"adapter {adapter_id!r} version {version} ({vdir})"
        try:
            if self.identity is not None and meta.get("encrypted") is not True:
                raise AdapterCorruptError(f"{where} is not sealed, but this registry is keyed: a plaintext version "
                                          "could have been written without the key (refused)")
            if meta.get("encrypted") is True:
                config, tensors = self._open_sealed(adapter_id, version, vdir, where)
            else:
                config, tensors = self._read_plain(vdir, meta, where)
            if not isinstance(config, dict):
                raise AdapterCorruptError(f"{where}: adapter config is not a JSON object")
            for name, tensor in tensors.items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise AdapterCorruptError(f"{where}: tensor {name} holds NaN or Inf")
        except ServingError:
            raise
        except Exception as exc:  # noqa: BLE001 - anything else wrong with stored files is corruption too
            raise AdapterCorruptError(f"{where}: {type(exc).__name__}: {exc}") from exc
        return StoredAdapter(adapter_id, version, config, tensors, meta)

    def _read_plain(self, vdir: Path, meta: Mapping[str, Any], where: str
                    ) -> tuple[dict[str, Any], OrderedDict[str, torch.Tensor]]:
        hashes = meta.get("sha256")
        if not isinstance(hashes, dict):
            raise AdapterCorruptError(f"{where}: {VERSION_META} has no sha256 table")
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            path = vdir / name
            if not path.is_file():
                raise AdapterCorruptError(f"{where}: {name} is missing")
            if hashes.get(name) != _sha256(path):
                raise AdapterCorruptError(f"{where}: {name} does not match its sha256 in {VERSION_META} "
                                          "(corrupt or modified after publishing)")
        try:
            config = json.loads((vdir / ADAPTER_CONFIG).read_text())
            tensors = OrderedDict(load_file(str(vdir / ADAPTER_WEIGHTS)))
        except Exception as exc:  # noqa: BLE001 - any parse failure of verified files is corruption
            raise AdapterCorruptError(f"{where}: unreadable: {exc}") from exc
        return config, tensors

    def _open_sealed(self, adapter_id: str, version: int, vdir: Path, where: str
                     ) -> tuple[dict[str, Any], OrderedDict[str, torch.Tensor]]:
        from fedpeft.common.wire.envelopes import read_envelope_file

        if self.identity is None:
            raise AdapterCorruptError(f"{where} is sealed, but this registry was opened without its key")
        try:
            envelope = read_envelope_file(vdir / SEALED_WEIGHTS)
            tensors = open_delta(envelope, recipient=self.identity, trusted_senders=self.trusted, replay_guard=None,
                                 expected_run_id=_sealed_run_id(adapter_id), expected_round=version)
        except (EnvelopeError, DeltaError, OSError) as exc:
            raise AdapterCorruptError(f"{where}: sealed weights refused: {exc}") from exc
        raw = tensors.pop(CONFIG_TENSOR, None)
        if raw is None:
            raise AdapterCorruptError(f"{where}: sealed payload has no adapter config")
        try:
            config = json.loads(bytes(raw.numpy().tobytes()).decode())
        except (ValueError, UnicodeDecodeError) as exc:
            raise AdapterCorruptError(f"{where}: sealed adapter config is not JSON: {exc}") from exc
        return config, tensors

    # --- writing ---------------------------------------------------------------------

    def publish(self, adapter_id: str, adapter_dir: Path, metadata: Mapping[str, Any] | None = None) -> int:
        """Copy the PEFT dir `adapter_dir` in as the next version and make it current."""
        check_adapter_id(adapter_id)
        adapter_dir = Path(adapter_dir)
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if not (adapter_dir / name).is_file():
                raise ConfigError(f"{adapter_dir} is not a PEFT adapter dir: {name} is missing")
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
        tensors = OrderedDict(load_file(str(adapter_dir / ADAPTER_WEIGHTS)))
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise DeltaError(f"refusing to publish {adapter_dir}: tensor {name} holds NaN or Inf")
        base = self._adapter_dir(adapter_id)
        base.mkdir(parents=True, exist_ok=True)
        with _locked(base / ".publish.lock"):
            return self._publish_locked(adapter_id, base, config, tensors, adapter_dir, metadata)

    def _publish_locked(self, adapter_id: str, base: Path, config: dict[str, Any], tensors: Mapping[str, torch.Tensor],
                        adapter_dir: Path, metadata: Mapping[str, Any] | None) -> int:
        version = max(self.versions(adapter_id), default=0) + 1
        meta: dict[str, Any] = {
            "adapter_id": adapter_id,
            "version": version,
            "published_at": time.time(),
            "peft_type": config.get("peft_type"),
            "rank": config.get("r"),
            "encrypted": self.identity is not None,
            **dict(metadata or {}),
        }
        tmp = Path(tempfile.mkdtemp(prefix=".publish-", dir=base))
        try:
            if self.identity is None:
                shutil.copyfile(adapter_dir / ADAPTER_CONFIG, tmp / ADAPTER_CONFIG)
                shutil.copyfile(adapter_dir / ADAPTER_WEIGHTS, tmp / ADAPTER_WEIGHTS)
                meta["sha256"] = {name: _sha256(tmp / name) for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
            else:
                self._seal_into(tmp, adapter_id, version, config, tensors)
            write_json_atomic(tmp / VERSION_META, meta)
            os.replace(tmp, self._version_dir(adapter_id, version))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._set_current(adapter_id, version)
        return version

    def _seal_into(self, directory: Path, adapter_id: str, version: int, config: Mapping[str, Any],
                   tensors: Mapping[str, torch.Tensor]) -> None:
        from fedpeft.common.wire.envelopes import write_envelope_file

        assert self.identity is not None
        payload = OrderedDict(tensors)
        payload[CONFIG_TENSOR] = torch.frombuffer(bytearray(json.dumps(config, sort_keys=True).encode()),
                                                  dtype=torch.uint8)
        envelope = seal_delta(payload, run_id=_sealed_run_id(adapter_id), round=version, client_id=PUBLISHER_ID,
                              method=str(config.get("peft_type", "LORA")).lower(), sender=self.identity,
                              recipient_public_x25519=self.identity.public_x25519)
        write_envelope_file(directory / SEALED_WEIGHTS, envelope)

    def rollback(self, adapter_id: str, version: int) -> int:
        """Make `version` the one "latest" means (any existing version, older or newer).

        The next publish moves "latest" to the new version again."""
        version = self.resolve(adapter_id, version) if version else self.current(adapter_id)
        with _locked(self._adapter_dir(adapter_id) / ".publish.lock"):
            self._set_current(adapter_id, version)
        return version

    def _set_current(self, adapter_id: str, version: int) -> None:
        atomic_write_bytes(self._adapter_dir(adapter_id) / CURRENT, f"{version}\n".encode())

    # --- paths -----------------------------------------------------------------------

    def _adapter_dir(self, adapter_id: str) -> Path:
        try:
            check_adapter_id(adapter_id)
        except ConfigError as exc:
            raise AdapterNotFoundError(str(exc)) from None
        return self.root / adapter_id

    def _version_dir(self, adapter_id: str, version: int) -> Path:
        return self._adapter_dir(adapter_id) / _version_dir_name(version)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock: concurrent publishers (two runs, a CLI) take turns."""
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sealed_run_id(adapter_id: str) -> str:
    return f"registry/{adapter_id}"

