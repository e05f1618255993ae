"""The heterogeneous-rank LoRA strategy: per-node ranks, downlinks, validation and clipping."""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedpeft.common.errors import ConfigError
from fedpeft.common.methods import make_config
from fedpeft.common.methods.lora import lora_scaling
from fedpeft.common.protocol.deltas import DeltaSpec
from fedpeft.common.protocol.flower_io import delta_from_arrayrecord, delta_to_arrayrecord, record_bytes
from fedpeft.common.protocol.plan import RANK_KEY, TRAIN_METRIC_KEYS
from fedpeft.server.hetero_lora import aggregate_flexlora, aggregate_hetlora, restrict
from fedpeft.server.hetero_strategy import HeteroRanks, RankAssignment
from fedpeft.server.robust import UNBOUNDED
from fedpeft.server.strategy import build_strategy

A, B = "m.q.lora_A.default.weight", "m.q.lora_B.default.weight"
RANKS = (2, 4, 8)
NODES = (31, 7, 19)  # sorted: 7 -> 2, 19 -> 4, 31 -> 8
SCALING = partial(lora_scaling, 16)


def _delta(rank: int, gen: torch.Generator, scale: float = 1.0) -> OrderedDict:
    return OrderedDict([(A, scale * torch.randn(rank, 5, generator=gen)), (B, scale * torch.randn(6, rank, generator=gen))])


class Grid:
    """Three nodes that declare partitions 0, 1, 2 in ascending node-id order (unless told otherwise)."""

    def __init__(self, declared: dict[int, int] | None = None) -> None:
        self.declared = dict(zip(sorted(NODES), range(len(NODES)), strict=True)) if declared is None else declared

    def get_node_ids(self):
        return list(NODES)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error

        for msg in messages:
            assert msg.metadata.message_type == "query" and msg.content["config"]["fedpeft-query"] == "partition-id"
            node = msg.metadata.dst_node_id
            if node in self.declared:
                reply = Message(RecordDict({"partition": MetricRecord({"partition-id": self.declared[node]})}),
                                reply_to=msg)
            else:
                reply = Message(Error(code=0, reason="no answer"), reply_to=msg)
            yield reply


def _build(mode="flexlora", clip=0.0, name="fedavg", robust=None):
    global_spec = DeltaSpec.of_delta(_delta(8, torch.Generator()))
    return build_strategy(name, spec=global_spec, max_delta_bytes=100_000, min_train_nodes=3, min_available_nodes=3,
                          fraction_evaluate=0.0, clip_update_norm=clip, robust=robust,
                          hetero=HeteroRanks(mode=mode, ranks=RANKS, scaling=SCALING))


def _reply(request: Message, delta, examples=10) -> Message:
    metrics = MetricRecord({k: (examples if k == "num-examples" else 1 if k == "unit-weight" else 0.5)
                            for k in TRAIN_METRIC_KEYS})
    return Message(RecordDict({"arrays": delta_to_arrayrecord(delta), "metrics": metrics}), reply_to=request)


def _round(strategy, global_delta):
    messages = list(strategy.configure_train(1, delta_to_arrayrecord(global_delta), ConfigRecord({"x": 1}), Grid()))
    return {m.metadata.dst_node_id: m for m in messages}


def test_each_node_is_sent_its_rank_and_the_global_restricted_to_it(flower_task_identity):
    strategy = _build()
    global_delta = _delta(8, torch.Generator().manual_seed(0))
    sent = _round(strategy, global_delta)
    assert {node: m.content["config"][RANK_KEY] for node, m in sent.items()} == {7: 2, 19: 4, 31: 8}
    for message in sent.values():
        rank = message.content["config"][RANK_KEY]
        assert message.content["config"]["x"] == 1 and message.content["config"]["server-round"] == 1
        got = delta_from_arrayrecord(message.content["arrays"])
        expected = restrict(global_delta, rank, SCALING)
        assert got[A].shape == (rank, 5) and got[B].shape == (6, rank)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    # downlink bytes are counted per message: lower-rank nodes are sent less
    assert strategy.traffic[1].bytes_down == sum(record_bytes(m.content["arrays"]) for m in sent.values())
    assert strategy.traffic[1].bytes_down < 3 * record_bytes(delta_to_arrayrecord(global_delta))


def test_ranks_follow_the_partition_each_node_declares_not_its_node_id(flower_task_identity):
    """Client k trains at ranks[k % len(ranks)] whatever node id Flower gave it (random in
    simulation and deployment alike); a node that does not answer takes the lowest free turn."""
    strategy = _build()
    messages = strategy.configure_train(1, delta_to_arrayrecord(_delta(8, torch.Generator().manual_seed(0))),
                                        ConfigRecord({}), Grid({7: 2, 19: 0}))
    assert {m.metadata.dst_node_id: m.content["config"][RANK_KEY] for m in messages} == {7: 8, 19: 2, 31: 4}


def test_two_nodes_declaring_one_partition_do_not_share_its_turn():
    from fedpeft.server.hetero_strategy import RankAssignment

    assignment = RankAssignment(RANKS)
    assignment.assign([7, 19, 31], {7: 0, 19: 0, 31: 1})
    assert assignment.turn_of == {7: 0, 31: 1, 19: 2}
    assert [assignment.rank_of(n) for n in (7, 31, 19)] == [2, 4, 8]


@pytest.mark.parametrize("mode", ["hetlora", "flexlora"])
def test_replies_at_their_ranks_are_aggregated_like_the_math(flower_task_identity, mode):
    strategy = _build(mode)
    sent = _round(strategy, _delta(8, torch.Generator().manual_seed(0)))
    gen = torch.Generator().manual_seed(1)
    deltas = {7: _delta(2, gen), 19: _delta(4, gen), 31: _delta(8, gen)}
    examples = {7: 10, 19: 20, 31: 30}
    arrays, metrics = strategy.aggregate_train(1, [_reply(sent[n], d, examples[n]) for n, d in deltas.items()])
    merged = delta_from_arrayrecord(arrays)
    # the strategy accumulates in float64 (and casts the result back to the delta's float32)
    ordered = [OrderedDict((k, v.double()) for k, v in deltas[n].items()) for n in (7, 19, 31)]
    if mode == "hetlora":
        expected = aggregate_hetlora(ordered, [10, 20, 30], 8, SCALING)
    else:
        expected, report = aggregate_flexlora(ordered, [10, 20, 30], 8, SCALING, RANKS)
        assert strategy.rank_errors[1] == pytest.approx(report.max_relative_error, abs=1e-12)
        assert set(strategy.rank_errors[1]) == set(RANKS)
        assert strategy.rank_errors[1][2] > strategy.rank_errors[1][8] >= 0  # lower rank loses more
    torch.testing.assert_close(merged[B] @ merged[A], (expected[B] @ expected[A]).float())
    assert merged[A].shape == (8, 5) and strategy.traffic[1].accepted == 3 and "train-loss" in metrics


def test_a_reply_at_another_rank_than_assigned_is_rejected(flower_task_identity):
    strategy = _build()
    sent = _round(strategy, _delta(8, torch.Generator().manual_seed(0)))
    gen = torch.Generator().manual_seed(1)
    replies = [_reply(sent[7], _delta(4, gen)),  # assigned rank 2, sends rank 4 (a valid rank for another node)
               _reply(sent[19], _delta(4, gen)), _reply(sent[31], _delta(8, gen))]
    strategy.aggregate_train(1, replies)
    traffic = strategy.traffic[1]
    assert traffic.accepted == 2 and len(traffic.rejected) == 1
    assert "node 7" in traffic.rejected[0] and "shape (4, 5) != expected (2, 5)" in traffic.rejected[0]


def test_a_reply_from_a_node_never_assigned_a_rank_is_rejected(flower_task_identity):
    strategy = _build()
    sent = _round(strategy, _delta(8, torch.Generator().manual_seed(0)))
    stranger = Message(content=RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=99, message_type="train")
    gen = torch.Generator().manual_seed(1)
    strategy.aggregate_train(1, [_reply(sent[19], _delta(4, gen)), _reply(stranger, _delta(2, gen))])
    assert strategy.traffic[1].accepted == 1 and "never assigned a LoRA rank" in strategy.traffic[1].rejected[0]


def test_clipping_measures_each_update_against_what_that_node_was_sent(flower_task_identity):
    """One poisoned rank-2 client sends a 100x scaled delta: clipped, the others untouched."""
    global_delta = _delta(8, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    honest = {n: restrict(global_delta, r, SCALING) for n, r in [(19, 4), (31, 8)]}
    for d in honest.values():
        d[B] = d[B] + 0.01 * torch.randn(d[B].shape, generator=gen)  # small honest updates
    poisoned = _delta(2, gen, scale=100.0)

    def merged_update(clip: float) -> float:
        strategy = _build("hetlora", clip=clip, robust=UNBOUNDED)  # clipping alone, not the default refusals
        sent = _round(strategy, global_delta)
        replies = [_reply(sent[7], poisoned), *(_reply(sent[n], d) for n, d in honest.items())]
        merged = delta_from_arrayrecord(strategy.aggregate_train(1, replies)[0])
        if clip:
            assert strategy.traffic[1].clipped == 1  # only the poisoned update; honest ones are short
        return float(torch.linalg.matrix_norm(SCALING(8) * (merged[B] @ merged[A] - global_delta[B] @ global_delta[A])))

    assert merged_update(clip=1.0) < merged_update(clip=0.0) / 100


def test_hetero_ranks_need_fedavg_and_a_matching_global_rank(flower_task_identity):
    with pytest.raises(ConfigError, match="use it with strategy 'fedavg'"):
        _build(name="fedmedian")
    with pytest.raises(ConfigError, match="largest client rank"):
        HeteroRanks.for_lora("flexlora", [2, 4], make_config("lora", {"r": "8"}))
    with pytest.raises(ConfigError, match="plain LoRA"):
        HeteroRanks.for_lora("hetlora", [2, 8], make_config("lora", {"r": "8", "use_dora": "true"}))
    with pytest.raises(ConfigError, match="choose one of"):
        _build(mode="flora")
    with pytest.raises(ConfigError, match="integers >= 1"):
        RankAssignment([0, 4])


def test_ranks_are_assigned_once_and_cycled_over_nodes_in_order():
    assignment = RankAssignment([2, 4])
    assignment.assign([9, 3, 5])
    assignment.assign([5, 1])  # a node seen later gets the next rank of the cycle
    assert assignment.by_node == {3: 2, 5: 4, 9: 2, 1: 4}
    assert assignment.max_rank == 4


@pytest.mark.parametrize("mode", ["hetlora", "flexlora"])
def test_sealed_flat_replies_are_opened_against_each_nodes_own_rank(flower_task_identity, tmp_path, mode):
    from fedpeft.common.codecs.mod import flat_upload_record
    from fedpeft.common.security.envelope import PeerIdentity, seal_delta, sign_metrics
    from fedpeft.common.wire import envelope_to_bytes
    from fedpeft.server.sealed_replies import EnvelopeOpener

    server, clients = PeerIdentity.generate(), {n: PeerIdentity.generate() for n in NODES}
    strategy = _build(mode)
    sent = _round(strategy, _delta(8, torch.Generator().manual_seed(0)))
    assert strategy.flat_upload
    strategy.unseal = EnvelopeOpener(server, {c.public_keys.key_id: c.public_ed25519 for c in clients.values()}, "run",
                                     strategy.upload_spec(), replay_path=tmp_path / "replay.json",
                                     spec_of=strategy.upload_spec)
    gen = torch.Generator().manual_seed(1)
    sealed = []
    for node, rank in ((7, 2), (19, 4), (31, 8)):
        delta = _delta(rank, gen)
        metrics = _reply(sent[node], delta, examples=10 * rank).content["metrics"]
        payload = delta_from_arrayrecord(flat_upload_record(OrderedDict((k, v.numpy()) for k, v in delta.items())))
        envelope = seal_delta(payload, run_id="run", round=1, client_id=clients[node].public_keys.key_id,
                              method="lora", sender=clients[node], recipient_public_x25519=server.public_x25519)
        signature = sign_metrics(envelope, {k: float(v) for k, v in metrics.items()}, clients[node])
        sealed.append(Message(RecordDict({"metrics": metrics, "envelope": ConfigRecord(
            {"envelope": envelope_to_bytes(envelope), "client-id": "x", "metrics-signature": signature})}),
            reply_to=sent[node]))
    arrays, _ = strategy.aggregate_train(1, sealed)
    assert strategy.traffic[1].accepted == 3, strategy.traffic[1].rejected
    reference = _build(mode)
    reference_sent = _round(reference, _delta(8, torch.Generator().manual_seed(0)))
    gen = torch.Generator().manual_seed(1)
    expected, _ = reference.aggregate_train(1, [_reply(reference_sent[n], _delta(r, gen), examples=10 * r)
                                               for n, r in ((7, 2), (19, 4), (31, 8))])
    assert all(torch.equal(delta_from_arrayrecord(arrays)[k], delta_from_arrayrecord(expected)[k]) for k in (A, B))
