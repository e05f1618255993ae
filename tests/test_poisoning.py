"""One bad client cannot poison a round: the findings of the bad-input battery, one test each.

Each test here failed on the code before the reply bounds (`fedpeft.server.robust`) and the
exact `.npy` layout check existed; numbers refer to the findings of the issue.
"""

from __future__ import annotations

import io
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedpeft.common.errors import ConfigError, DeltaError
from fedpeft.common.methods.lora import lora_scaling
from fedpeft.common.protocol.deltas import DeltaSpec
from fedpeft.common.protocol.flower_io import delta_from_arrayrecord, delta_to_arrayrecord
from fedpeft.common.protocol.plan import TRAIN_METRIC_KEYS
from fedpeft.common.security.envelope import PeerIdentity, seal_delta, sign_metrics
from fedpeft.common.wire import envelope_to_bytes
from fedpeft.server.hetero_strategy import HeteroRanks
from fedpeft.server.robust import UNBOUNDED, RobustSettings
from fedpeft.server.sealed_replies import EnvelopeOpener, load_trusted_clients
from fedpeft.server.strategy import STRATEGIES, RoundTraffic, build_strategy

SPEC_DELTA = OrderedDict(a=torch.zeros(2, 3), b=torch.zeros(4))
NODES = (1, 2, 3, 4)


class Grid:
    def get_node_ids(self):
        return list(NODES)


def _metrics(examples=10, **changed) -> MetricRecord:
    values = {k: (examples if k == "num-examples" else 1 if k == "unit-weight" else 0.5) for k in TRAIN_METRIC_KEYS}
    return MetricRecord({**values, **changed})


def _request(node: int) -> Message:
    return Message(content=RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="train")


def _reply(node: int, delta, metrics=None) -> Message:
    arrays = delta if not isinstance(delta, dict) else delta_to_arrayrecord(delta)
    return Message(RecordDict({"arrays": arrays, "metrics": metrics or _metrics()}), reply_to=_request(node))


def _delta(value: float) -> OrderedDict:
    return OrderedDict((k, torch.full_like(v, value)) for k, v in SPEC_DELTA.items())


def _strategy(name="fedavg", robust=None, **kwargs):
    strategy = build_strategy(name, spec=DeltaSpec.of_delta(SPEC_DELTA), max_delta_bytes=10_000, min_train_nodes=4,
                              min_available_nodes=4, fraction_evaluate=0.0, robust=robust, **kwargs)
    list(strategy.configure_train(1, delta_to_arrayrecord(_delta(0.0)), ConfigRecord(), Grid()))
    return strategy


def _honest(n: int = 3) -> list[Message]:
    return [_reply(node, _delta(1.0 + 0.1 * node)) for node in NODES[:n]]


def _assert_refused_alone(record: ArrayRecord) -> None:
    """A round with three honest replies and node 4's `record` accepts the three, refuses node 4."""
    strategy = _strategy()
    strategy.aggregate_train(1, [*_honest(), _reply(4, record)])
    assert strategy.traffic[1].accepted == 3 and "node 4" in strategy.traffic[1].rejected[0]


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedavgm"])
def test_1_a_huge_example_count_is_refused_not_a_silent_zero_round(flower_task_identity, name):
    strategy = _strategy(name)
    arrays, _ = strategy.aggregate_train(1, [*_honest(), _reply(4, _delta(1.0), _metrics(examples=9e307))])
    merged = delta_from_arrayrecord(arrays)
    assert strategy.traffic[1].accepted == 3 and "num-examples" in strategy.traffic[1].rejected[0]
    assert torch.all(merged["a"] > 1.0)  # the honest mean, not all zeros


def test_1_an_integer_example_count_above_the_cap_is_refused(flower_task_identity):
    strategy = _strategy(robust=RobustSettings(max_examples=1000))
    strategy.aggregate_train(1, [*_honest(), _reply(4, _delta(1.0), _metrics(examples=1001))])
    assert "robust.max_examples" in strategy.traffic[1].rejected[0]


def test_1_an_example_count_far_above_the_rounds_median_is_refused(flower_task_identity):
    strategy = _strategy(robust=RobustSettings(examples_ratio=100.0))
    strategy.aggregate_train(1, [*_honest(), _reply(4, _delta(1.0), _metrics(examples=10 * 101))])
    assert "robust.examples_ratio" in strategy.traffic[1].rejected[0]


def test_2_huge_finite_lora_values_are_refused_under_hetlora(flower_task_identity):
    a, b = "m.q.lora_A.default.weight", "m.q.lora_B.default.weight"
    full = OrderedDict([(a, torch.zeros(4, 5)), (b, torch.zeros(6, 4))])
    strategy = build_strategy("fedavg", spec=DeltaSpec.of_delta(full), max_delta_bytes=100_000, min_train_nodes=3,
                              min_available_nodes=3, fraction_evaluate=0.0,
                              hetero=HeteroRanks(mode="hetlora", ranks=(2, 4), scaling=lambda r: lora_scaling(8, r)))

    class HeteroGrid:
        def get_node_ids(self):
            return [1, 2, 3]

        def send_and_receive(self, messages, timeout=None):
            return [Message(RecordDict({"partition": MetricRecord({"partition-id": m.metadata.dst_node_id - 1})}),
                            reply_to=m) for m in messages]

    sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, delta_to_arrayrecord(full), ConfigRecord(),
                                                                        HeteroGrid())}
    ranks = {node: int(m.content["config"]["lora-rank"]) for node, m in sent.items()}
    replies = [Message(RecordDict({"arrays": delta_to_arrayrecord(
        OrderedDict([(a, torch.full((ranks[n], 5), 0.1)), (b, torch.full((6, ranks[n]), 3.4e38 if n == 3 else 0.1))])),
        "metrics": _metrics()}), reply_to=sent[n]) for n in (1, 2, 3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    merged = delta_from_arrayrecord(arrays)
    assert all(torch.isfinite(t).all() for t in merged.values())
    assert "robust.max_abs_value" in strategy.traffic[1].rejected[0]


def test_2_a_non_finite_aggregate_never_replaces_the_global_adapter(flower_task_identity):
    """With every bound off, finite float32 values can still overflow in the server optimizer's step
    (FedAvgM's server learning rate here): the aggregate is refused, the global adapter kept."""
    strategy = _strategy("fedavgm", robust=UNBOUNDED, options={"server_learning_rate": "1e33"})
    big = [_reply(node, _delta(1.0e6)) for node in NODES]
    before = strategy.current_arrays
    arrays, metrics = strategy.aggregate_train(1, big)
    assert arrays is None and metrics is None
    assert "aggregate: non-finite" in strategy.traffic[1].rejected[-1]
    # the server optimizer's own state is rolled back too: the next round builds on the kept adapter
    assert strategy.current_arrays is before and strategy.momentum_vector is None
    arrays, _ = strategy.aggregate_train(1, _honest(4))
    assert arrays is not None and all(a.dtype == "float32" for a in arrays.values())
    assert all(a.dtype == "float32" for a in strategy.current_arrays.values())  # not float64 drift


def test_2_values_beyond_the_exact_sum_cost_only_their_own_reply(flower_task_identity):
    """With every bound off, the exact weighted sum still holds each reply to its share of
    the float64 integer range: a reply beyond it is refused by name, the others aggregate."""
    strategy = _strategy(robust=UNBOUNDED)
    arrays, _ = strategy.aggregate_train(1, [*_honest(), _reply(4, _delta(3.0e38))])
    assert arrays is not None and strategy.traffic[1].accepted == 3
    assert "exceeds what an exact sum" in strategy.traffic[1].rejected[0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_4_a_non_finite_or_negative_metric_is_refused(flower_task_identity, bad):
    strategy = _strategy()
    _, metrics = strategy.aggregate_train(1, [*_honest(), _reply(4, _delta(1.0), _metrics(**{"bytes-up": bad}))])
    assert "'bytes-up'" in strategy.traffic[1].rejected[0]
    assert all(np.isfinite(v) for v in metrics.values())


def test_5_a_flipped_npy_header_byte_is_refused(flower_task_identity):
    record = delta_to_arrayrecord(_delta(1.0))
    good = record["b"]
    header = good.data.replace(b"(4,)", b"(3,)")  # the header now claims 3 values, 4 follow
    assert header != good.data
    record["b"] = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=header)
    with pytest.raises(DeltaError, match=r"\.npy header says"):
        delta_from_arrayrecord(record)
    # the record's own shape changed to match: now the byte count is wrong
    record["b"] = Array(dtype=good.dtype, shape=(3,), stype=good.stype, data=header)
    with pytest.raises(DeltaError, match="data bytes"):
        delta_from_arrayrecord(record)
    _assert_refused_alone(record)


def test_5_trailing_bytes_are_refused():
    buffer = io.BytesIO()
    np.save(buffer, np.ones(4, dtype=np.float32))
    record = delta_to_arrayrecord(_delta(1.0))
    record["b"] = Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=buffer.getvalue() + b"\0" * 4)
    with pytest.raises(DeltaError, match="20 data bytes, but float32 \\(4,\\) needs 16"):
        delta_from_arrayrecord(record)


@pytest.mark.parametrize("declared", [True, False])
def test_5_negative_header_dimensions_are_refused_not_a_crashed_round(flower_task_identity, declared):
    """(-2, -3) has the byte count of (2, 3): only the sign check stands between it and reshape."""
    record = delta_to_arrayrecord(_delta(1.0))
    good = record["b"]
    data = good.data.replace(b"'shape': (4,), ", b"'shape': (-2, -2), ")
    assert data != good.data
    record["b"] = Array(dtype=good.dtype if declared else "", shape=(-2, -2) if declared else (),
                        stype=good.stype, data=data)
    with pytest.raises(DeltaError, match="invalid shape"):
        delta_from_arrayrecord(record)
    _assert_refused_alone(record)


def test_5_flowers_legacy_records_declare_nothing_and_still_decode_exactly():
    """The SecAgg+ workflow broadcasts through Flower's legacy Parameters, whose Arrays declare
    dtype "" and shape (): the header decides, and the byte count still has to match it."""
    from flwr.common import ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import parameters_to_arrayrecord

    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    legacy = parameters_to_arrayrecord(ndarrays_to_parameters([values]), keep_input=True)
    assert legacy["0"].dtype == "" and tuple(legacy["0"].shape) == ()
    np.testing.assert_array_equal(delta_from_arrayrecord(legacy)["0"].numpy(), values)
    padded = Array(dtype="", shape=(), stype="numpy.ndarray", data=legacy["0"].data + b"\0" * 4)
    with pytest.raises(DeltaError, match="data bytes"):
        delta_from_arrayrecord(ArrayRecord({"0": padded}))


def test_6_a_list_valued_metric_is_refused_not_a_crashed_round(flower_task_identity):
    strategy = _strategy()
    arrays, metrics = strategy.aggregate_train(1, [*_honest(), _reply(4, _delta(1.0), _metrics(**{"train-loss": [0.1, 0.2]}))])
    assert arrays is not None and "must be a number, got list" in strategy.traffic[1].rejected[0]


SERVER = PeerIdentity.generate()


def _sealed(node: int, sender: PeerIdentity, metrics: MetricRecord, signed: MetricRecord | None = None) -> Message:
    envelope = seal_delta(_delta(1.0), run_id="run", round=1, client_id=sender.public_keys.key_id, method="lora",
                          sender=sender, recipient_public_x25519=SERVER.public_x25519)
    signature = sign_metrics(envelope, {k: float(v) for k, v in (signed or metrics).items()}, sender)
    return Message(RecordDict({"metrics": metrics, "envelope": ConfigRecord({
        "envelope": envelope_to_bytes(envelope), "client-id": "x", "metrics-signature": signature})}),
        reply_to=_request(node))


@pytest.mark.parametrize("bad", [{"train-loss": [0.1]}, {"bytes-up": float("nan")}, {"num-examples": 10**9}],
                         ids=["list", "nan", "huge-weight"])
def test_4_6_sealed_metrics_are_checked_before_the_envelope_uses_up_its_nonce(flower_task_identity, tmp_path, bad):
    clients = [PeerIdentity.generate() for _ in NODES]
    spec = DeltaSpec.of_delta(SPEC_DELTA)
    strategy = _strategy()
    strategy.unseal = EnvelopeOpener(SERVER, {c.public_keys.key_id: c.public_ed25519 for c in clients}, "run", spec,
                                     replay_path=tmp_path / "replay.json")
    honest = [_sealed(n, c, _metrics()) for n, c in zip(NODES[:3], clients, strict=False)]
    bad_metrics = _metrics(**bad)
    first = _sealed(4, clients[3], bad_metrics, signed=_metrics())
    strategy.aggregate_train(1, [*honest, first])
    assert strategy.traffic[1].accepted == 3 and "node 4" in strategy.traffic[1].rejected[0]
    assert "replayed" not in strategy.traffic[1].rejected[0]
    assert len(strategy.unseal.guard) == 3  # only the three accepted envelopes used up their nonces


def test_8_a_non_utf8_key_file_names_the_file(tmp_path):
    (tmp_path / "client.json").write_bytes(b"\xff\xfe{not utf-8")
    with pytest.raises(ConfigError, match="client.json"):
        load_trusted_clients(tmp_path)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_refuses_the_same_bad_reply(flower_task_identity, name):
    options = {"num_malicious_nodes": "0"} if "krum" in name else None
    strategy = _strategy(name, options=options)
    strategy.aggregate_train(1, [*_honest(), _reply(4, _delta(1.0), _metrics(**{"train-loss": float("nan")}))])
    assert strategy.traffic[1].accepted == 3 and len(strategy.traffic[1].rejected) == 1


def test_9_the_documented_minimum_temperature_survives_protobufs_float32():
    from fedpeft.common.protocol.serving_api import MIN_TEMPERATURE, GenerateParams, Sampling
    from fedpeft.common.wire.serving import generate_params, generate_request

    sent = GenerateParams("a", 0, "hi", 4, Sampling(temperature=MIN_TEMPERATURE))
    received = generate_params(generate_request(sent))
    assert received.sampling.temperature != MIN_TEMPERATURE  # float32 on the wire: 0.0099999998
    assert received.sampling.problems(vocab_size=100) == []
    assert Sampling(temperature=0.0099).problems(vocab_size=100)  # below the minimum is still refused


@pytest.mark.parametrize(("overrides", "key"), [
    ({"task.eval_limit": 2147483648}, "task.eval_limit"),
    ({"training.local_epochs": float("inf")}, "training.local_epochs"),
    ({"federation.round_timeout": float("nan")}, "federation.round_timeout"),
    ({"federation.round_timeout": -1.0}, "federation.round_timeout"),
    ({"task.eval_limit": -1}, "task.eval_limit"),
    ({"task.eval_every": 0}, "task.eval_every"),
    ({"task.eval_every": 2**40}, "task.eval_every"),
    ({"training.weight_decay": float("inf")}, "training.weight_decay"),
    ({"robust.norm_bound_ratio": float("inf")}, "robust.norm_bound_ratio"),
    ({"robust.max_abs_value": -1.0}, "robust.max_abs_value"),
    ({"federation.seed": 2**32}, "federation.seed"),
    ({"training.local_epochs": 1e15}, "local_epochs"),  # finite, and a client would never finish
    ({"training.batch_size": 2**40}, "batch_size"),  # the plan's seed range: no client could take it
])
def test_8_run_configs_that_would_fail_later_or_hang_are_refused_up_front(overrides, key):
    from fedpeft.server.federation.spec import RunSpec

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        RunSpec().with_overrides(overrides, driver="simulation")


@pytest.mark.parametrize(("overrides", "key"), [
    ({"secagg.retry_wait": float("nan")}, "secagg.retry_wait"),
    ({"secagg.timeout": float("inf")}, "secagg.timeout"),
    ({"split.port": 70000, "federation.topology": "split"}, "split.port"),
    ({"split.max_abs_activation": float("nan"), "federation.topology": "split"}, "split.max_abs_activation"),
    ({"robust.norm_bound": 1.0}, "robust.norm_bound"),
])
def test_8_deployment_settings_are_range_checked(overrides, key):
    from fedpeft.server.federation.spec import RunSpec

    base = {"secagg.enabled": True} if key.startswith(("secagg", "robust")) else {}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        RunSpec().with_overrides({**base, **overrides}, driver="deployment")


@pytest.mark.parametrize("value", [2, "2", 2.0])
def test_krum_needs_more_than_2f_plus_2_clients_per_round_whatever_the_option_type(value):
    from fedpeft.server.federation.spec import RunSpec

    with pytest.raises(ConfigError, match="num_malicious_nodes=2 only with more than 6"):
        RunSpec().with_overrides({"federation.clients": 6, "federation.strategy": "krum",
                                  "federation.strategy_options": {"num_malicious_nodes": value}}, driver="simulation")


def test_8_a_non_utf8_run_config_names_the_file(tmp_path):
    from fedpeft.server.federation.spec import RunSpec

    path = tmp_path / "run.toml"
    path.write_bytes(b"[federation]\nrounds = 1\n# \xff\xfe\n")
    with pytest.raises(ConfigError, match="run.toml"):
        RunSpec.from_toml(path)


def test_secagg_round_statistics_take_only_well_formed_metrics_matching_the_secagg_weight(flower_task_identity):
    """Under SecAgg+ the server cannot refuse one client's masked update, but a client's
    plaintext metrics reach the round's statistics only if they pass the same checks as any
    reply's, with num-examples equal to the weight SecAgg+ used and within secagg.max_weight."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from fedpeft.server.federation.spec import SecAggSection
    from fedpeft.server.secagg import SecAggFedAvg

    initial = _delta(0.0)
    strategy = SecAggFedAvg(spec=DeltaSpec.of_delta(SPEC_DELTA), initial=initial, plan_json="{}",
                            settings=SecAggSection(enabled=True), min_accepted=1, round_offset=0,
                            evaluate_global=lambda rnd, arrays: MetricRecord({}))
    summed = ndarrays_to_parameters([t.numpy() for t in _delta(0.5).values()])

    def result(num_examples: int, **changes) -> tuple[None, FitRes]:
        return None, FitRes(Status(Code.OK, ""), summed, num_examples, dict(_metrics(4, **changes)))

    results = [result(4), result(10**9, **{"train-loss": 1e308, "num-examples": 10**9}),  # beyond max_weight
               result(4, **{"bytes-up": -1}), result(3)]  # negative bytes; metric != SecAgg+'s weight (4 != 3)
    strategy.traffic[1] = RoundTraffic()
    strategy.aggregate_fit(1, results, [])
    traffic = strategy.traffic[1]
    assert traffic.accepted == 4 and len(traffic.client_metrics) == 1
    assert np.isfinite(traffic.train_metrics["train-loss"])
