"""A plain reply travels as one fp32 buffer: the client's exact bits, decoded with one header
check, read in place by the fold, and refused with a reason when it is malformed."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedpeft.common.codecs.mod import ENCODED_ARRAY, FLAT_UPLOAD_KEY, codec_mod, encoded_record, flat_upload_record
from fedpeft.common.codecs.wire import FP32, decode_flat, encode, encode_fp32
from fedpeft.common.errors import DeltaError
from fedpeft.common.protocol.deltas import DeltaSpec
from fedpeft.common.protocol.flower_io import delta_from_arrayrecord, delta_to_arrayrecord
from fedpeft.common.protocol.plan import TRAIN_METRIC_KEYS
from fedpeft.server.compression import FlatDelta, decode_flat_reply
from fedpeft.server.robust import RobustSettings
from fedpeft.server.strategy import build_strategy

NODES = tuple(range(1, 9))
EVEN = OrderedDict(a=torch.zeros(4, 6), b=torch.zeros(10))  # contiguous parts: read in place
ODD = OrderedDict(a=torch.zeros(3, 5), b=torch.zeros(7))  # padded parts: decoded, then concatenated


class Grid:
    def get_node_ids(self):
        return list(NODES)


def _delta(like: OrderedDict, seed: int) -> OrderedDict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return OrderedDict((k, torch.from_numpy((rng.standard_normal(tuple(v.shape)) * 0.1).astype(np.float32)))
                       for k, v in like.items())


def _strategy(like: OrderedDict, **kwargs):
    strategy = build_strategy("fedavg", spec=DeltaSpec.of_delta(like), max_delta_bytes=10_000,
                              min_train_nodes=len(NODES), min_available_nodes=len(NODES), fraction_evaluate=0.0,
                              **kwargs)
    sent = list(strategy.configure_train(1, delta_to_arrayrecord(like), ConfigRecord(), Grid()))
    return strategy, sent


def _reply(request: Message, record: ArrayRecord, seed: int) -> Message:
    rng = np.random.default_rng(seed)
    metrics = {k: (int(rng.integers(100, 5_000)) if k == "num-examples" else 1 if k == "unit-weight"
                   else float(rng.random())) for k in TRAIN_METRIC_KEYS}
    return Message(RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}), reply_to=request)


def _flat(delta: OrderedDict) -> ArrayRecord:
    return flat_upload_record(OrderedDict((k, v.numpy()) for k, v in delta.items()))


@pytest.mark.parametrize("like", [EVEN, ODD], ids=["contiguous", "padded"])
def test_flat_replies_aggregate_to_the_same_bits_as_one_array_per_tensor(flower_task_identity, like):
    deltas = [_delta(like, seed) for seed in NODES]
    results = []
    for pack in (delta_to_arrayrecord, _flat):
        strategy, sent = _strategy(like, robust=RobustSettings(norm_bound=100.0))
        assert sent[0].content.config_records["config"][FLAT_UPLOAD_KEY] is True
        replies = [_reply(m, pack(d), i) for i, (m, d) in enumerate(zip(sent, deltas, strict=True))]
        arrays, _ = strategy.aggregate_train(1, replies)
        assert arrays is not None and strategy.traffic[1].accepted == len(NODES)
        results.append(delta_from_arrayrecord(arrays))
    for name in like:
        assert torch.equal(results[0][name], results[1][name])


def test_a_contiguous_flat_reply_is_read_in_place(flower_task_identity):
    spec = DeltaSpec.of_delta(EVEN)
    record = _flat(_delta(EVEN, 0))
    delta = decode_flat_reply(record, spec, 10_000)
    assert isinstance(delta, FlatDelta) and delta.flat.base is not None and not delta.flat.flags.writeable
    assert torch.equal(delta["a"], _delta(EVEN, 0)["a"]) and list(delta) == ["a", "b"]


def test_malformed_flat_replies_cost_only_their_own_update(flower_task_identity):
    deltas = [_delta(EVEN, seed) for seed in NODES]
    strategy, sent = _strategy(EVEN)
    good = _flat(deltas[0])
    payload = bytes(good[ENCODED_ARRAY].data[-good[ENCODED_ARRAY].numpy().size:])  # the raw payload
    nan = deltas[2].copy()
    nan["b"] = nan["b"].clone()
    nan["b"][3] = float("nan")  # the client's encoder sends it as it is: the server judges it
    bad = {
        1: encoded_record(payload[:-4]),  # truncated
        2: _flat(nan),  # a NaN in b[3]
        3: _flat(OrderedDict(a=deltas[3]["a"].reshape(6, 4), b=deltas[3]["b"])),  # another layout
    }
    replies = [_reply(m, bad.get(i, _flat(d)), i) for i, (m, d) in enumerate(zip(sent, deltas, strict=True))]
    arrays, _ = strategy.aggregate_train(1, replies)
    rejected = " | ".join(strategy.traffic[1].rejected)
    assert strategy.traffic[1].accepted == len(NODES) - 3, rejected
    assert "needs exactly" in rejected
    assert "b: 1 NaN and 0 Inf values" in rejected
    assert "layout differs" in rejected and "a (6, 4) != (4, 6)" in rejected
    clean, _ = _strategy(EVEN)[0].aggregate_train(1, [_reply(m, _flat(d), i) for i, (m, d) in
                                                      enumerate(zip(sent, deltas, strict=True)) if i not in bad])
    # (the same accepted replies, aggregated without the bad ones: nothing of theirs was folded)
    assert all(torch.equal(delta_from_arrayrecord(arrays)[k], delta_from_arrayrecord(clean)[k]) for k in EVEN)


def test_a_flat_payload_with_another_header_is_refused_by_name():
    spec_layout = DeltaSpec.of_delta(EVEN).shapes
    values = OrderedDict((k, v.numpy()) for k, v in _delta(EVEN, 1).items())
    payload = encode_fp32(values)
    assert payload == encode(FP32, values)[0]  # the fp32 codec's own bytes, finite or not
    assert np.array_equal(decode_flat(payload, spec_layout), np.concatenate(
        [v.numpy().reshape(-1) for v in _delta(EVEN, 1).values()]))
    with pytest.raises(DeltaError, match="exceeds the limit"):
        decode_flat(payload, spec_layout, max_bytes=len(payload) - 1)
    renamed = OrderedDict((("z" if k == "a" else k), v.numpy()) for k, v in _delta(EVEN, 1).items())
    with pytest.raises(DeltaError, match="layout differs"):
        decode_flat(encode_fp32(renamed), spec_layout)


def test_a_spec_that_is_not_float32_asks_for_one_array_per_tensor(flower_task_identity):
    like = OrderedDict(a=torch.zeros(4, dtype=torch.float16))
    strategy = build_strategy("fedavg", spec=DeltaSpec.of_delta(like), max_delta_bytes=10_000, min_train_nodes=1,
                              min_available_nodes=1, fraction_evaluate=0.0)

    class One:
        def get_node_ids(self):
            return [1]

    sent = list(strategy.configure_train(1, delta_to_arrayrecord(like), ConfigRecord(), One()))
    assert FLAT_UPLOAD_KEY not in sent[0].content.config_records["config"]
    assert strategy.upload_spec() is strategy.spec


def test_the_client_mod_sends_the_trained_delta_itself_in_one_buffer():
    trained = _delta(EVEN, 7)
    trained["b"][1] = float("inf")  # a diverged client's reply still leaves: the server refuses it by name
    request = Message(RecordDict({"arrays": delta_to_arrayrecord(EVEN),
                                  "config": ConfigRecord({FLAT_UPLOAD_KEY: True})}), dst_node_id=1, message_type="train")

    def handler(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"arrays": delta_to_arrayrecord(trained), "metrics": MetricRecord({"x": 1.0})}),
                       reply_to=msg)

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = codec_mod(request, context, handler)
    assert list(reply.content.array_records["arrays"].keys()) == [ENCODED_ARRAY]
    decoded = decode_flat_reply(reply.content.array_records["arrays"], DeltaSpec.of_delta(EVEN), 10_000)
    assert all(torch.equal(decoded[k], trained[k]) for k in EVEN)  # the exact bits, not an update
    assert DeltaSpec.of_delta(EVEN).problems(decoded) == ["b: 0 NaN and 1 Inf values"]
    assert reply.content.metric_records["metrics"]["x"] == 1.0
