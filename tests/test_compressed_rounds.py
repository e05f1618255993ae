"""Compressed rounds on the coordinator: the broadcast is encoded, each reply's update decoded
against its node's layout and added to the exact global delta it was sent; a reply that does
not decode costs only its own update; envelopes carry the payload, DP clips the decoded update."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpeft.common.codecs import Codec, decode, encode
from fedpeft.common.codecs.mod import (
    DOWNLOAD_CODEC_KEY,
    UPLOAD_CODEC_KEY,
    encoded_record,
    payload_of,
)
from fedpeft.common.protocol.deltas import DeltaSpec
from fedpeft.common.protocol.flower_io import delta_from_arrayrecord, delta_to_arrayrecord
from fedpeft.common.protocol.plan import TRAIN_METRIC_KEYS
from fedpeft.common.security.envelope import PeerIdentity, seal_delta, sign_metrics
from fedpeft.common.wire import envelope_to_bytes
from fedpeft.server.compression import Compression, plain_nbytes
from fedpeft.server.sealed_replies import EnvelopeOpener
from fedpeft.server.strategy import build_strategy

SPEC_DELTA = OrderedDict(a=torch.zeros(16, 8), b=torch.zeros(40))
SPEC = DeltaSpec.of_delta(SPEC_DELTA)
LAYOUT = OrderedDict((n, tuple(t.shape)) for n, t in SPEC_DELTA.items())
NODES = (1, 2, 3, 4)
GLOBAL = OrderedDict((n, torch.linspace(-1, 1, t.numel()).reshape(t.shape)) for n, t in SPEC_DELTA.items())


@pytest.fixture(autouse=True)
def _flower_messages(flower_task_identity):
    """Flower Messages need a task identity (conftest)."""


class Grid:
    def get_node_ids(self):
        return list(NODES)


def _metrics(examples: int = 10) -> MetricRecord:
    return MetricRecord({k: (examples if k == "num-examples" else 1 if k == "unit-weight" else 0.5) for k in TRAIN_METRIC_KEYS})


def _request(node: int) -> Message:
    return Message(content=RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="train")


def _update(node: int) -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(node)
    return OrderedDict((n, (rng.standard_normal(s) * 0.01).astype(np.float32)) for n, s in LAYOUT.items())


def _reply(node: int, upload: str, payload: bytes | None = None) -> Message:
    payload = payload if payload is not None else encode(Codec.parse(upload), _update(node))[0]
    return Message(RecordDict({"arrays": encoded_record(payload), "metrics": _metrics()}), reply_to=_request(node))


def _strategy(upload="fp32", download=None, **kwargs):
    compression = Compression.from_names(upload, download or "none")
    strategy = build_strategy("fedavg", spec=SPEC, max_delta_bytes=100_000, min_train_nodes=4, min_available_nodes=4,
                              fraction_evaluate=0.0, compression=compression, **kwargs)
    messages = list(strategy.configure_train(1, delta_to_arrayrecord(GLOBAL), ConfigRecord({"x": 1}), Grid()))
    return strategy, messages


def test_the_aggregate_is_the_exact_global_delta_plus_the_mean_decoded_update():
    strategy, _ = _strategy("fp32")
    arrays, _ = strategy.aggregate_train(1, [_reply(n, "fp32") for n in NODES[:3]])
    merged = delta_from_arrayrecord(arrays)
    for name in LAYOUT:
        mean = np.mean([_update(n)[name].astype(np.float64) for n in NODES[:3]], axis=0)
        torch.testing.assert_close(merged[name], GLOBAL[name] + torch.from_numpy(mean).float(), rtol=0, atol=1e-7)


def test_the_broadcast_is_encoded_once_and_the_config_names_both_codecs():
    strategy, messages = _strategy("topk:0.25+int8", "bf16")
    records = {id(m.content.array_records["arrays"]) for m in messages}
    assert len(records) == 1  # one shared encoded record
    config = messages[0].content.config_records["config"]
    assert config[UPLOAD_CODEC_KEY] == "topk:0.25+int8" and config[DOWNLOAD_CODEC_KEY] == "bf16"
    received = decode(payload_of(messages[0].content.array_records["arrays"]), Codec.parse("bf16"), LAYOUT)
    assert all(np.abs(received[n] - GLOBAL[n].numpy()).max() <= 2**-8 for n in LAYOUT)
    traffic = strategy.traffic[1]
    assert traffic.bytes_down_raw == 4 * plain_nbytes(SPEC) and traffic.bytes_down < traffic.bytes_down_raw * 0.6


def test_a_reply_in_another_codec_is_rejected_and_the_round_goes_on(caplog):
    strategy, _ = _strategy("topk:0.25+int8")
    replies = [_reply(n, "topk:0.25+int8") for n in NODES[:3]] + [_reply(4, "topk:0.25+nf4")]
    arrays, _ = strategy.aggregate_train(1, replies)
    traffic = strategy.traffic[1]
    assert arrays is not None and traffic.accepted == 3
    assert "encoded with codec 'topk:0.25+nf4', but this run uses 'topk:0.25+int8'" in traffic.rejected[0]
    assert traffic.bytes_up_raw == 4 * plain_nbytes(SPEC) and traffic.bytes_up * 3 < traffic.bytes_up_raw


def test_a_plaintext_reply_to_a_compressed_run_is_rejected():
    strategy, _ = _strategy("int8")
    plain = Message(RecordDict({"arrays": delta_to_arrayrecord(GLOBAL), "metrics": _metrics()}), reply_to=_request(4))
    strategy.aggregate_train(1, [_reply(n, "int8") for n in NODES[:3]] + [plain])
    assert "expected a compressed delta" in strategy.traffic[1].rejected[0]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["flip", "truncate", "extend", "splice"]), st.integers(0, 10**6), st.integers(0, 255),
       st.sampled_from(["topk:0.25+int8", "nf4", "fp16"]))
def test_a_mutated_payload_either_decodes_to_a_finite_update_or_costs_only_its_own_reply(kind, where, byte, upload):
    honest_strategy, _ = _strategy(upload)
    honest, _ = honest_strategy.aggregate_train(1, [_reply(n, upload) for n in NODES[:3]])
    payload = bytearray(encode(Codec.parse(upload), _update(4))[0])
    i = where % len(payload)
    if kind == "flip":
        payload[i] ^= byte or 1
    elif kind == "truncate":
        del payload[i:]
    elif kind == "extend":
        payload += bytes([byte]) * (1 + where % 16)
    else:
        payload[i:i] = bytes([byte])
    strategy, _ = _strategy(upload)
    arrays, _ = strategy.aggregate_train(1, [_reply(n, upload) for n in NODES[:3]] + [_reply(4, upload, bytes(payload))])
    merged = delta_from_arrayrecord(arrays)
    assert all(bool(torch.isfinite(t).all()) for t in merged.values())
    if strategy.traffic[1].rejected:
        assert strategy.traffic[1].accepted == 3
        expected = delta_from_arrayrecord(honest)
        assert all(torch.equal(merged[n], expected[n]) for n in LAYOUT)
    else:
        assert strategy.traffic[1].accepted == 4


def test_under_dp_the_decoded_update_is_clipped_to_the_bound_the_accountant_assumes():
    from fedpeft.server.federation.spec import DpSection
    from fedpeft.server.privacy import build_dp_strategy

    dp = DpSection(enabled=True, noise_multiplier=1e-6, clipping_norm=0.05)
    strategy = build_dp_strategy(spec=SPEC, max_delta_bytes=100_000, min_accepted=1, clip_update_norm=0.0, dp=dp,
                                 clients_per_round=4, population=4, compression=Compression.from_names("int8", "none"))
    list(strategy.configure_train(1, delta_to_arrayrecord(GLOBAL), ConfigRecord({"x": 1}), Grid()))
    big = OrderedDict((n, np.full(s, 0.1, np.float32)) for n, s in LAYOUT.items())  # norm 0.1 * sqrt(168) > 0.05
    replies = [Message(RecordDict({"arrays": encoded_record(encode(Codec.parse("int8"), big)[0]), "metrics": _metrics()}),
                       reply_to=_request(n)) for n in NODES]
    arrays, _ = strategy.aggregate_train(1, replies)
    merged = delta_from_arrayrecord(arrays)
    moved = torch.sqrt(sum(((merged[n] - GLOBAL[n]).double() ** 2).sum() for n in LAYOUT))
    assert strategy.traffic[1].clipped == 4 and float(moved) == pytest.approx(0.05, rel=1e-5)


def test_a_sealed_envelope_carries_the_compressed_update(tmp_path):
    server, client = PeerIdentity.generate(), PeerIdentity.generate()
    compression = Compression.from_names("topk:0.25+int8", "none")
    strategy, _ = _strategy("topk:0.25+int8")
    strategy.unseal = EnvelopeOpener(server, {client.public_keys.key_id: client.public_ed25519}, "run-1",
                                     compression.wire_spec(SPEC), replay_path=tmp_path / "replay.json")
    payload = encode(Codec.parse("topk:0.25+int8"), _update(1))[0]
    sealed_tensors = delta_from_arrayrecord(encoded_record(payload))
    envelope = seal_delta(sealed_tensors, run_id="run-1", round=1, client_id=client.public_keys.key_id, method="lora",
                          sender=client, recipient_public_x25519=server.public_x25519)
    signature = sign_metrics(envelope, {k: float(v) for k, v in _metrics().items()}, client)
    sealed = Message(RecordDict({"metrics": _metrics(), "envelope": ConfigRecord({
        "envelope": envelope_to_bytes(envelope), "client-id": "x", "metrics-signature": signature})}),
        reply_to=_request(1))
    arrays, _ = strategy.aggregate_train(1, [sealed])
    assert strategy.traffic[1].accepted == 1
    expected = decode(payload, Codec.parse("topk:0.25+int8"), LAYOUT)
    merged = delta_from_arrayrecord(arrays)
    assert all(torch.allclose(merged[n], GLOBAL[n] + torch.from_numpy(expected[n]), atol=1e-7) for n in LAYOUT)
    # a sealed payload of another size is refused by the envelope's spec before it is decoded
    wrong = seal_delta(delta_from_arrayrecord(encoded_record(payload + b"\0" * 8)), run_id="run-1", round=1,
                       client_id=client.public_keys.key_id, method="lora", sender=client,
                       recipient_public_x25519=server.public_x25519)
    assert compression.wire_spec(SPEC).problems(delta_from_arrayrecord(encoded_record(payload + b"\0" * 8)))
    assert wrong.size > envelope.size


@pytest.mark.parametrize("driver, sections, fragment", [
    ("simulation", {"compression": {"upload": "int7"}}, "compression.upload 'int7': unknown codec"),
    ("simulation", {"compression": {"download": "topk:0.1+int8"}}, "the broadcast is the whole global delta"),
    ("simulation", {"compression": {"upload": "int8"}, "federation": {"scaffold": True}},
     "compression cannot run with federation.scaffold = True"),
    ("simulation", {"compression": {"upload": "int8"}, "federation": {"topology": "split"}},
     "compression cannot run with federation.topology = 'split'"),
    ("simulation", {"compression": {"error_feedback": False}},
     "compression.error_feedback is set, but would be ignored without compression.upload"),
    ("deployment", {"compression": {"upload": "int8"}, "secagg": {"enabled": True}, "federation": {"clients": 3}},
     "compression cannot run with secagg.enabled = True"),
])
def test_the_spec_refuses_what_compression_cannot_run_with(driver, sections, fragment):
    from fedpeft.common.errors import ConfigError
    from fedpeft.server.federation.spec import RunSpec

    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("+", r"\+")):
        RunSpec.from_dict(sections, driver=driver)


def test_peft_sim_flags_set_the_codecs():
    from fedpeft.server.federation.flags import spec_from_flags

    spec = spec_from_flags(upload_codec="topk:0.1+int8", download_codec="fp16", error_feedback=False, seed=4)
    compression = spec.compression_settings()
    assert compression is not None and compression.upload.name == "topk:0.1+int8"
    assert compression.download.name == "fp16" and not compression.error_feedback and compression.seed == 4
    assert spec_from_flags().compression_settings() is None
