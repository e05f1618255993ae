"""Sealed client replies: every bad envelope is rejected with its reason, the round goes on."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedpeft.common.protocol.deltas import DeltaSpec
from fedpeft.common.protocol.flower_io import delta_from_arrayrecord, delta_to_arrayrecord
from fedpeft.common.protocol.plan import TRAIN_METRIC_KEYS
from fedpeft.common.security.envelope import PeerIdentity, seal_delta, sign_metrics
from fedpeft.common.wire import envelope_to_bytes
from fedpeft.server.sealed_replies import EnvelopeOpener, load_trusted_clients
from fedpeft.server.strategy import build_strategy

SPEC_DELTA = OrderedDict(a=torch.zeros(2, 3), b=torch.zeros(4))
RUN = "run-1"
SERVER = PeerIdentity.generate()


def _delta(value: float) -> OrderedDict:
    return OrderedDict((k, torch.full_like(v, value)) for k, v in SPEC_DELTA.items())


def _metrics(examples: int = 10) -> MetricRecord:
    return MetricRecord({k: (examples if k == "num-examples" else 1 if k == "unit-weight" else 0.5) for k in TRAIN_METRIC_KEYS})


def _request(node: int) -> Message:
    return Message(content=RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="train")


def _sealed_reply(node: int, sender: PeerIdentity, delta=None, *, rnd: int = 1, run: str = RUN, to: PeerIdentity = SERVER,
                  data: bytes | None = None, examples: int = 10, claimed: int | None = None) -> Message:
    """A reply as the client's trainer seals it; `claimed` = a weight changed after signing."""
    signature = b"\x00" * 64
    if data is None:
        envelope = seal_delta(delta if delta is not None else _delta(1.0), run_id=run, round=rnd,
                              client_id=sender.public_keys.key_id, method="lora", sender=sender,
                              recipient_public_x25519=to.public_x25519)
        data = envelope_to_bytes(envelope)
        signature = sign_metrics(envelope, {k: float(v) for k, v in _metrics(examples).items()}, sender)
    metrics = _metrics(claimed if claimed is not None else examples)
    content = RecordDict({"metrics": metrics, "envelope": ConfigRecord({"envelope": data, "client-id": "x",
                                                                        "metrics-signature": signature})})
    return Message(content, reply_to=_request(node))


FIRST_GOOD_CLIENT: list[PeerIdentity] = []


@pytest.fixture()
def clients():
    made = [PeerIdentity.generate() for _ in range(3)]
    FIRST_GOOD_CLIENT[:] = [made[0]]
    return made


@pytest.fixture()
def strategy(flower_task_identity, clients, tmp_path):
    spec = DeltaSpec.of_delta(SPEC_DELTA)
    strategy = build_strategy("fedavg", spec=spec, max_delta_bytes=10_000, min_train_nodes=1, min_available_nodes=1,
                              fraction_evaluate=0.0)
    trusted = {c.public_keys.key_id: c.public_ed25519 for c in clients}
    strategy.unseal = EnvelopeOpener(SERVER, trusted, RUN, spec, replay_path=tmp_path / "replay.json")
    return strategy


def _tampered(client: PeerIdentity) -> bytes:
    data = bytearray(envelope_to_bytes(seal_delta(_delta(1.0), run_id=RUN, round=1, client_id=client.public_keys.key_id,
                                                  method="lora", sender=client, recipient_public_x25519=SERVER.public_x25519)))
    data[-80] ^= 0x01  # a bit inside the ciphertext
    return bytes(data)


def _bad_shape(client: PeerIdentity) -> Message:
    bad = OrderedDict(a=torch.ones(3, 2), b=torch.ones(4))
    return _sealed_reply(9, client, bad)


def _nan(client: PeerIdentity) -> Message:
    bad = _delta(1.0)
    bad["b"][1] = float("inf")
    return _sealed_reply(9, client, bad)


BAD = {
    "truncated": (lambda c: _sealed_reply(9, c, data=envelope_to_bytes(seal_delta(
        _delta(1.0), run_id=RUN, round=1, client_id=c.public_keys.key_id, method="lora", sender=c,
        recipient_public_x25519=SERVER.public_x25519))[:-40]), "malformed"),
    "tampered": (lambda c: _sealed_reply(9, c, data=_tampered(c)), "tampered"),
    "wrong key": (lambda c: _sealed_reply(9, c, to=PeerIdentity.generate()), "wrong recipient"),
    "untrusted": (lambda c: _sealed_reply(9, PeerIdentity.generate()), "untrusted sender"),
    "other round": (lambda c: _sealed_reply(9, c, rnd=7), "wrong run or round"),
    "other run": (lambda c: _sealed_reply(9, c, run="another-run"), "wrong run or round"),
    "garbage": (lambda c: _sealed_reply(9, c, data=b"\x00not an envelope"), "malformed"),
    "oversized": (lambda c: _sealed_reply(9, c, data=b"\x0a" * 200_000), "oversized"),
    "wrong shape": (_bad_shape, "shape (3, 2) != expected (2, 3)"),
    "inf": (_nan, "1 inf values"),
    "weight altered": (lambda c: _sealed_reply(9, c, claimed=10**5), "weight or metrics altered"),
    "second update": (lambda c: _sealed_reply(9, FIRST_GOOD_CLIENT[0], _delta(9.0)), "already delivered an update"),
    "plaintext": (lambda c: Message(RecordDict({"arrays": delta_to_arrayrecord(_delta(1.0)), "metrics": _metrics()}),
                                    reply_to=_request(9)), "no sealed envelope"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_envelope_is_rejected_with_its_reason_and_the_round_completes(strategy, clients, case, caplog):
    make, reason = BAD[case]
    replies = [_sealed_reply(1, clients[0], _delta(1.0)), _sealed_reply(2, clients[1], _delta(4.0)), make(clients[2])]
    arrays, _ = strategy.aggregate_train(1, replies)
    merged = delta_from_arrayrecord(arrays)
    assert torch.allclose(merged["a"], torch.full((2, 3), 2.5))  # the two good replies, equally weighted
    traffic = strategy.traffic[1]
    assert traffic.accepted == 2 and len(traffic.rejected) == 1
    assert reason in traffic.rejected[0].lower(), traffic.rejected[0]
    assert "rejected update from node 9" in caplog.text


def test_a_replayed_envelope_is_rejected_even_across_a_restart(strategy, clients, tmp_path):
    first = _sealed_reply(1, clients[0], _delta(1.0))
    copy = Message(RecordDict({"metrics": _metrics(), "envelope": first.content.config_records["envelope"]}),
                   reply_to=_request(2))
    strategy.aggregate_train(1, [first, _sealed_reply(3, clients[1])])
    fresh = build_strategy("fedavg", spec=DeltaSpec.of_delta(SPEC_DELTA), max_delta_bytes=10_000, min_train_nodes=1,
                           min_available_nodes=1, fraction_evaluate=0.0)
    fresh.unseal = EnvelopeOpener(SERVER, strategy.unseal.trusted, RUN, strategy.unseal.spec,
                                  replay_path=tmp_path / "replay.json")  # a restarted server reads the guard back
    fresh.aggregate_train(1, [copy, _sealed_reply(4, clients[2])])
    assert "replayed" in fresh.traffic[1].rejected[0]


def test_seal_config_names_the_servers_key_and_the_run(strategy):
    config = strategy.unseal.seal_config("lora")
    assert bytes.fromhex(config["fedpeft-seal-to"]) == SERVER.public_x25519 and config["fedpeft-run-id"] == RUN


def test_trusted_clients_come_from_public_key_files(tmp_path, clients):
    for i, c in enumerate(clients):
        (tmp_path / f"c{i}.json").write_text(c.public_keys.to_json())
    assert load_trusted_clients(tmp_path) == {c.public_keys.key_id: c.public_ed25519 for c in clients}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception, match="no client public keys"):
        load_trusted_clients(empty)
