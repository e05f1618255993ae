"""Delta envelopes: exact round trips, and every kind of bad envelope refused for the right reason."""

from __future__ import annotations

import dataclasses
import json
import pickle
import stat
from collections import OrderedDict

import pytest
import torch

from fedpeft.common.errors import ConfigError, DeltaError
from fedpeft.common.protocol.deltas import DeltaSpec
from fedpeft.common.security import envelope as envelope_module
from fedpeft.common.security.envelope import (
    Envelope,
    EnvelopeError,
    IdentityError,
    PeerIdentity,
    PublicKeys,
    Rejection,
    ReplayGuard,
    TensorInfo,
    canonical_header,
    envelope_size_limit,
    open_delta,
    seal_delta,
)
from fedpeft.common.wire import envelope_from_bytes, envelope_to_bytes, read_envelope_file, write_envelope_file

RUN, ROUND, CLIENT = "run-1", 3, "client-1"


@pytest.fixture(scope="module")
def sender() -> PeerIdentity:
    return PeerIdentity.generate()


@pytest.fixture(scope="module")
def recipient() -> PeerIdentity:
    return PeerIdentity.generate()


@pytest.fixture()
def delta() -> OrderedDict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return OrderedDict(
        [
            ("layers.0.q_proj.lora_A.weight", torch.randn(4, 16, generator=gen)),
            ("layers.0.q_proj.lora_B.weight", torch.randn(16, 4, generator=gen).to(torch.bfloat16)),
            ("layers.1.prefix.embedding", torch.randn(2, 3, 5, generator=gen).to(torch.float16)),
            ("layers.1.adapter.steps", torch.tensor([7, -1], dtype=torch.int64)),
        ]
    )


def _seal(delta, sender, recipient, **overrides) -> Envelope:
    args = {"run_id": RUN, "round": ROUND, "client_id": CLIENT, "method": "lora"} | overrides
    return seal_delta(delta, sender=sender, recipient_public_x25519=recipient.public_x25519, **args)


def _open(envelope, sender, recipient, **overrides):
    args = {"trusted_senders": {CLIENT: sender.public_ed25519}, "replay_guard": ReplayGuard()} | overrides
    return open_delta(envelope, recipient=recipient, **args)


def _rejection(call) -> Rejection:
    with pytest.raises(EnvelopeError) as info:
        call()
    return info.value.reason


def _resign(envelope: Envelope, signer: PeerIdentity) -> Envelope:
    """What a trusted but buggy or malicious sender could produce: any content, validly signed."""
    message = envelope_module._signed_message(canonical_header(envelope), envelope.ciphertext)
    return dataclasses.replace(envelope, signature=signer._signing_key.sign(message))


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def test_seal_open_round_trip_is_bit_identical_through_the_wire(delta, sender, recipient):
    # Prepare
    envelope = _seal(delta, sender, recipient)
    # Execute
    received = envelope_from_bytes(envelope_to_bytes(envelope))
    opened = _open(received, sender, recipient)
    # Assert
    assert received == envelope
    assert list(opened) == list(delta)
    for name, tensor in delta.items():
        assert opened[name].dtype == tensor.dtype and opened[name].shape == tensor.shape
        assert _bits(opened[name]) == _bits(tensor)


def test_ciphertext_hides_the_delta_and_every_seal_is_fresh(delta, sender, recipient):
    first, second = _seal(delta, sender, recipient), _seal(delta, sender, recipient)
    assert _bits(delta["layers.0.q_proj.lora_A.weight"])[:64] not in first.ciphertext
    assert first.nonce != second.nonce and first.ephemeral_public_key != second.ephemeral_public_key
    assert first.ciphertext != second.ciphertext


TAMPERED_FIELDS = {
    "run_id": "run-2",
    "round": ROUND + 1,
    "method": "prefix",
    "manifest": (TensorInfo("layers.0.q_proj.lora_A.weight", (16, 4), "float32"),),
    "recipient_public_key": PeerIdentity.generate().public_x25519,
    "ephemeral_public_key": PeerIdentity.generate().public_x25519,
    "nonce": bytes(12),
}


@pytest.mark.parametrize("field", sorted(TAMPERED_FIELDS))
def test_tampered_header_field_is_rejected_as_tampered(delta, sender, recipient, field):
    envelope = dataclasses.replace(_seal(delta, sender, recipient), **{field: TAMPERED_FIELDS[field]})
    assert _rejection(lambda: _open(envelope, sender, recipient)) is Rejection.TAMPERED


def test_tampered_client_id_is_rejected_even_when_both_ids_trust_the_key(delta, sender, recipient):
    # One device registered under two client ids: the signature still binds the id.
    envelope = dataclasses.replace(_seal(delta, sender, recipient), client_id="client-2")
    trusted = {CLIENT: sender.public_ed25519, "client-2": sender.public_ed25519}
    assert _rejection(lambda: _open(envelope, sender, recipient, trusted_senders=trusted)) is Rejection.TAMPERED


@pytest.mark.parametrize("field", ["ciphertext", "signature"])
def test_flipped_ciphertext_or_signature_byte_is_rejected_as_tampered(delta, sender, recipient, field):
    envelope = _seal(delta, sender, recipient)
    data = bytearray(getattr(envelope, field))
    data[len(data) // 2] ^= 0x01
    tampered = dataclasses.replace(envelope, **{field: bytes(data)})
    assert _rejection(lambda: _open(tampered, sender, recipient)) is Rejection.TAMPERED


def test_any_flipped_byte_on_the_wire_is_rejected(delta, sender, recipient):
    data = envelope_to_bytes(_seal(delta, sender, recipient))
    for i in range(len(data)):
        corrupted = bytearray(data)
        corrupted[i] ^= 0x20

        def receive(corrupted: bytes = bytes(corrupted)) -> None:
            _open(envelope_from_bytes(corrupted), sender, recipient)

        assert _rejection(receive) in {Rejection.MALFORMED, Rejection.UNTRUSTED_SENDER, Rejection.TAMPERED}, i


def test_unknown_format_version_is_rejected_as_malformed(delta, sender, recipient):
    envelope = dataclasses.replace(_seal(delta, sender, recipient), format_version=2)
    with pytest.raises(EnvelopeError, match="unsupported format version 2") as info:
        _open(envelope, sender, recipient)
    assert info.value.reason is Rejection.MALFORMED


def test_envelope_for_another_recipient_is_rejected(delta, sender, recipient):
    envelope = _seal(delta, sender, PeerIdentity.generate())
    with pytest.raises(EnvelopeError, match="not to this recipient") as info:
        _open(envelope, sender, recipient)
    assert info.value.reason is Rejection.WRONG_RECIPIENT


def test_signed_but_undecryptable_ciphertext_is_rejected(delta, sender, recipient):
    envelope = _seal(delta, sender, recipient)
    garbage = _resign(dataclasses.replace(envelope, ciphertext=bytes(len(envelope.ciphertext))), sender)
    assert _rejection(lambda: _open(garbage, sender, recipient)) is Rejection.DECRYPTION_FAILED


def test_unknown_client_is_rejected_as_untrusted(delta, sender, recipient):
    envelope = _seal(delta, sender, recipient, client_id="stranger")
    with pytest.raises(EnvelopeError, match="not a trusted sender") as info:
        _open(envelope, sender, recipient)
    assert info.value.reason is Rejection.UNTRUSTED_SENDER


def test_trusted_client_id_with_another_key_is_rejected_as_untrusted(delta, sender, recipient):
    impostor = PeerIdentity.generate()
    envelope = _seal(delta, impostor, recipient)  # claims CLIENT, signs with its own key
    with pytest.raises(EnvelopeError, match="registered with") as info:
        _open(envelope, sender, recipient)
    assert info.value.reason is Rejection.UNTRUSTED_SENDER


def test_envelope_for_another_round_is_rejected_when_a_round_is_expected(delta, sender, recipient):
    envelope = _seal(delta, sender, recipient)
    call = lambda: _open(envelope, sender, recipient, expected_run_id=RUN, expected_round=ROUND + 1)  # noqa: E731
    assert _rejection(call) is Rejection.WRONG_CONTEXT
    assert _open(envelope, sender, recipient, expected_run_id=RUN, expected_round=ROUND)


def test_replayed_envelope_is_rejected(delta, sender, recipient):
    guard = ReplayGuard()
    envelope = _seal(delta, sender, recipient)
    _open(envelope, sender, recipient, replay_guard=guard)
    assert _rejection(lambda: _open(envelope, sender, recipient, replay_guard=guard)) is Rejection.REPLAYED
    # a fresh envelope for the same round has a new nonce and is accepted
    _open(_seal(delta, sender, recipient), sender, recipient, replay_guard=guard)
    assert len(guard) == 2


def test_replay_is_rejected_after_reloading_a_persisted_guard(delta, sender, recipient, tmp_path):
    path = tmp_path / "state" / "replay.json"
    envelope = _seal(delta, sender, recipient)
    _open(envelope, sender, recipient, replay_guard=ReplayGuard(path))
    restarted = ReplayGuard(path)
    assert envelope.replay_key in restarted
    assert _rejection(lambda: _open(envelope, sender, recipient, replay_guard=restarted)) is Rejection.REPLAYED


def test_rejected_envelope_does_not_use_up_its_replay_key(delta, sender, recipient):
    guard = ReplayGuard()
    envelope = _seal(delta, sender, recipient)
    wrong_spec = DeltaSpec.of_delta({"other": torch.zeros(1)})
    with pytest.raises(EnvelopeError):
        _open(envelope, sender, recipient, replay_guard=guard, expected_spec=wrong_spec)
    assert len(guard) == 0


def test_corrupt_replay_guard_file_refuses_to_start(tmp_path):
    path = tmp_path / "replay.json"
    path.write_text(json.dumps({"format": "something else", "seen": []}))
    with pytest.raises(ConfigError, match="replay guard"):
        ReplayGuard(path)
    path.write_text("{truncated")
    with pytest.raises(ConfigError, match="replay guard"):
        ReplayGuard(path)


def test_every_truncation_of_the_wire_bytes_is_rejected_as_malformed(delta, sender, recipient):
    data = envelope_to_bytes(_seal(delta, sender, recipient))
    for cut in range(len(data)):
        assert _rejection(lambda cut=cut: envelope_from_bytes(data[:cut])) is Rejection.MALFORMED, cut


@pytest.mark.parametrize("seed", range(5))
def test_garbage_bytes_are_rejected_as_malformed(seed):
    garbage = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    assert _rejection(lambda: envelope_from_bytes(garbage.numpy().tobytes())) is Rejection.MALFORMED


def test_oversized_envelope_is_rejected_before_parsing_or_opening(delta, sender, recipient, tmp_path):
    envelope = _seal(delta, sender, recipient)
    data = envelope_to_bytes(envelope)
    assert _rejection(lambda: envelope_from_bytes(data, max_bytes=len(data) - 1)) is Rejection.OVERSIZED
    assert _rejection(lambda: _open(envelope, sender, recipient, max_bytes=100)) is Rejection.OVERSIZED
    write_envelope_file(tmp_path / "e.pb", envelope)
    assert _rejection(lambda: read_envelope_file(tmp_path / "e.pb", max_bytes=100)) is Rejection.OVERSIZED
    # the limit derived from the spec admits the real envelope
    limit = envelope_size_limit(DeltaSpec.of_delta(delta))
    assert len(data) <= limit and _open(envelope_from_bytes(data, max_bytes=limit), sender, recipient, max_bytes=limit)


def test_manifest_that_does_not_match_the_payload_is_rejected(delta, sender, recipient, monkeypatch):
    # A sender whose manifest lies about a shape (signed and encrypted consistently).
    honest = envelope_module.manifest_of(delta)
    lying = (dataclasses.replace(honest[0], shape=(16, 4)), *honest[1:])
    monkeypatch.setattr(envelope_module, "manifest_of", lambda _delta: lying)
    envelope = _seal(delta, sender, recipient)
    with pytest.raises(EnvelopeError, match=r"payload \(4, 16\) torch.float32 != manifest \(16, 4\)") as info:
        _open(envelope, sender, recipient)
    assert info.value.reason is Rejection.MANIFEST_MISMATCH


def test_nan_delta_is_rejected_with_expected_spec(delta, sender, recipient):
    spec = DeltaSpec.of_delta(delta)
    delta["layers.0.q_proj.lora_A.weight"][0, 0] = float("nan")
    envelope = _seal(delta, sender, recipient)
    with pytest.raises(EnvelopeError, match="1 NaN") as info:
        _open(envelope, sender, recipient, expected_spec=spec)
    assert info.value.reason is Rejection.INVALID_DELTA
    assert isinstance(info.value, DeltaError)


def test_wrong_layout_is_rejected_with_expected_spec(delta, sender, recipient):
    spec = DeltaSpec.of_delta({**delta, "layers.2.lora_A.weight": torch.zeros(2, 2)})
    with pytest.raises(EnvelopeError, match="layers.2.lora_A.weight: missing"):
        _open(_seal(delta, sender, recipient), sender, recipient, expected_spec=spec)


def test_envelope_error_pickles_with_its_reason():
    error = EnvelopeError(Rejection.REPLAYED, "seen before")
    copy = pickle.loads(pickle.dumps(error))
    assert copy.reason is Rejection.REPLAYED and str(copy) == str(error) == "envelope rejected (replayed): seen before"


def test_envelope_file_round_trip(delta, sender, recipient, tmp_path):
    envelope = _seal(delta, sender, recipient)
    write_envelope_file(tmp_path / "adapters" / "personal.pb", envelope)
    back = read_envelope_file(tmp_path / "adapters" / "personal.pb")
    assert back == envelope
    # a checkpoint may be read again: no replay guard for data at rest
    for _ in range(2):
        assert list(_open(back, sender, recipient, replay_guard=None)) == list(delta)


def test_identity_save_load_round_trip_with_private_files(delta, recipient, tmp_path):
    # Prepare
    identity = PeerIdentity.generate()
    # Execute
    identity.save(tmp_path / "id")
    loaded = PeerIdentity.load(tmp_path / "id")
    # Assert: same keys, 0600 private files, usable for signing and receiving
    assert loaded.public_keys == identity.public_keys
    for name in (PeerIdentity.SIGNING_FILE, PeerIdentity.AGREEMENT_FILE):
        assert stat.S_IMODE((tmp_path / "id" / name).stat().st_mode) == 0o600
        assert (tmp_path / "id" / name).read_text().startswith("-----BEGIN PRIVATE KEY-----")
    published = PublicKeys.from_json((tmp_path / "id" / PeerIdentity.PUBLIC_FILE).read_text())
    assert published == identity.public_keys
    opened = _open(_seal(delta, loaded, identity), identity, identity)  # signed by loaded, opened by original
    assert list(opened) == list(delta)
    assert identity.public_keys.key_id in repr(identity) and "PRIVATE" not in repr(identity)


def test_identity_save_refuses_to_overwrite(tmp_path):
    PeerIdentity.generate().save(tmp_path)
    with pytest.raises(IdentityError, match="already exists"):
        PeerIdentity.generate().save(tmp_path)
    PeerIdentity.generate().save(tmp_path, overwrite=True)


def test_identity_load_refuses_group_readable_keys(tmp_path):
    PeerIdentity.generate().save(tmp_path)
    (tmp_path / PeerIdentity.SIGNING_FILE).chmod(0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        PeerIdentity.load(tmp_path)


def test_password_protected_identity(tmp_path):
    identity = PeerIdentity.generate()
    identity.save(tmp_path, password=b"correct horse")
    assert "ENCRYPTED" in (tmp_path / PeerIdentity.SIGNING_FILE).read_text()
    assert PeerIdentity.load(tmp_path, password=b"correct horse").public_keys == identity.public_keys
    with pytest.raises(IdentityError):
        PeerIdentity.load(tmp_path, password=b"wrong")
    with pytest.raises(IdentityError):
        PeerIdentity.load(tmp_path)


def test_identity_load_refuses_a_key_of_the_wrong_type(tmp_path):
    identity = PeerIdentity.generate()
    identity.save(tmp_path)
    swapped = (tmp_path / PeerIdentity.AGREEMENT_FILE).read_bytes()
    (tmp_path / PeerIdentity.SIGNING_FILE).write_bytes(swapped)
    with pytest.raises(IdentityError, match="expected Ed25519PrivateKey"):
        PeerIdentity.load(tmp_path)
