"""SCAFFOLD over PEFT deltas: the paper's updates, its fix of client drift, and its checks.

The quadratic tests drive the real pieces (the local loop `run_steps` with
`DriftCorrection`, the client's Flower-state bookkeeping `control_variates`, the server's
`ServerControl`, which derives each change from the returned delta) on
f_i(y) = 1/2 sum a_i (y - b_i)^2, where everything is known in closed
form: plain SGD makes SCAFFOLD's client step exactly y <- y - lr (g - c_i + c), option II's
c_i+ is the mean of the gradients along the local path, and with heterogeneous clients
FedAvg stalls at a biased point that SCAFFOLD does not.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.client.training import TrainConfig, run_steps
from fedpeft.common.errors import ConfigError
from fedpeft.common.protocol.control_variates import (
    ACCEPTED_KEY,
    CLIENT_CONTROL_KEY,
    PENDING_CONTROL_KEY,
    SERVER_CONTROL_KEY,
    accepted_round,
    begin_round,
    end_round,
)
from fedpeft.common.protocol.deltas import DeltaSpec
from fedpeft.common.protocol.flower_io import delta_from_arrayrecord, delta_to_arrayrecord, record_bytes
from fedpeft.common.protocol.plan import TRAIN_METRIC_KEYS
from fedpeft.common.training.scaffold import DriftCorrection
from fedpeft.server.scaffold import ServerControl
from fedpeft.server.strategy import build_strategy

DIM = 3


def _quadratic_round(y0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, correction: torch.Tensor, lr: float,
                     steps: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One client's local round with the real loop: (y after, mean step, raw gradients seen)."""
    y = torch.nn.Parameter(y0.clone())
    spec = DeltaSpec.of_delta({"y": y0})
    drift = DriftCorrection({"y": y}, {"y": correction}, lr, spec)
    grads: list[torch.Tensor] = []

    def step(_step, _batch):
        loss = 0.5 * (a * (y - b) ** 2).sum()
        loss.backward()
        grads.append(y.grad.detach().clone())
        return float(loss.detach())

    config = TrainConfig(local_steps=steps, learning_rate=lr, max_grad_norm=1e9, log_every=10**6)
    run_steps([y], lambda _s: {}, config, step, seed=0, label="quadratic", optimizer=torch.optim.SGD([y], lr=lr),
              after_step=lambda _s: drift.after_step())
    return y.detach().clone(), drift.mean_step()["y"], grads


vectors = st.lists(st.floats(-3, 3), min_size=DIM, max_size=DIM).map(lambda v: torch.tensor(v, dtype=torch.float32))


@settings(max_examples=60, deadline=None)
@given(y0=vectors, b=vectors, c=vectors, ci=vectors,
       a=st.lists(st.floats(0.1, 2.0), min_size=DIM, max_size=DIM).map(torch.tensor),
       lr=st.floats(0.01, 0.3), steps=st.integers(1, 8))
def test_a_client_round_is_the_papers_corrected_sgd_and_option_two(y0, b, c, ci, a, lr, steps):
    y, mean_step, grads = _quadratic_round(y0, a, b, c - ci, lr, steps)
    expected = y0.double()
    for g in grads:  # y <- y - lr (g_i(y) - c_i + c), Algorithm 1 line 10
        expected = expected - lr * (g.double() - ci.double() + c.double())
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)
    # option II: c_i+ = c_i - c + (x - y) / (K lr) = the mean raw gradient along the path
    option_two = ci.double() - c.double() + (y0.double() - y.double()) / (steps * lr)
    torch.testing.assert_close(ci.double() - c.double() + mean_step.double(), option_two, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(option_two, torch.stack(grads).double().mean(0), rtol=1e-3, atol=1e-3)


def _record(value: np.ndarray) -> ArrayRecord:
    return ArrayRecord(OrderedDict(y=Array(np.asarray(value, dtype=np.float32))))


def _own(state: RecordDict) -> np.ndarray:
    return state.array_records[CLIENT_CONTROL_KEY]["y"].numpy()


@settings(max_examples=60, deadline=None)
@given(c=vectors, ci=vectors, m=vectors, folded=st.booleans())
def test_a_client_commits_ci_plus_only_when_the_server_folded_its_round(c, ci, m, folded):
    state = RecordDict({CLIENT_CONTROL_KEY: _record(ci.numpy())})
    correction = begin_round(_record(c.numpy()), 0, state)
    np.testing.assert_allclose(correction["y"].numpy(), (c - ci).numpy(), rtol=1e-6, atol=1e-6)
    end_round(_record(c.numpy()), _record(m.numpy()), 7, state)
    np.testing.assert_array_equal(_own(state), ci.numpy())  # pending until the server answers
    begin_round(_record(c.numpy()), 7 if folded else 6, state)
    expected = (ci - c + m) if folded else ci  # c_i+ = c_i - c + m (option II), or c_i kept
    np.testing.assert_allclose(_own(state), expected.numpy(), rtol=1e-5, atol=1e-5)
    assert PENDING_CONTROL_KEY not in state  # settled either way


def test_a_client_without_its_own_control_variate_starts_from_zero():
    c = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    other_run = RecordDict({CLIENT_CONTROL_KEY: ArrayRecord(OrderedDict(z=Array(np.ones(7, np.float32))))})
    for state in (RecordDict(), other_run):
        np.testing.assert_array_equal(begin_round(_record(c), 0, state)["y"].numpy(), c)


def test_a_malformed_accepted_round_is_refused():
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(ValueError, match="accepted-round"):
            accepted_round(RecordDict({ACCEPTED_KEY: ConfigRecord({"accepted-round": bad})}))
    assert accepted_round(RecordDict()) == 0


def _server(lr: float = 0.1, steps: int = 4, population: int = 4) -> ServerControl:
    return ServerControl(DeltaSpec.of_delta({"y": torch.zeros(DIM)}), population,
                         TrainConfig(learning_rate=lr, local_steps=steps))


def test_the_server_derives_option_two_and_moves_c_by_the_sampled_fraction():
    control = _server(lr=0.5, steps=2, population=4)
    sent = {"y": torch.zeros(DIM)}
    changes = [(1, control.change(sent, {"y": torch.tensor([-1.0, -2.0, -3.0])}, 10)),
               (2, control.change(sent, {"y": torch.tensor([-3.0, -2.0, -1.0])}, 10))]
    torch.testing.assert_close(changes[0][1]["y"], torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))  # (x-y)/(K lr) - 0
    control.fold(5, changes)  # c += |S|/N * mean = 2/4 * [2, 2, 2]
    torch.testing.assert_close(control.value["y"], torch.tensor([1.0, 1.0, 1.0]))
    np.testing.assert_array_equal(delta_from_arrayrecord(control.record())["y"].numpy(), [1.0, 1.0, 1.0])
    assert control.accepted == {1: 5, 2: 5} and control.node_config(3)["accepted-round"] == 0


def _federate(a: list[torch.Tensor], b: list[torch.Tensor], scaffold: bool, rounds: int, steps: int, lr: float,
              dropped=lambda _round, _client: False) -> torch.Tensor:
    """Full-participation rounds of (unweighted) FedAvg, with or without SCAFFOLD, through the real pieces;
    `dropped(round, client)` loses that client's reply (its update and its control variate change)."""
    x = torch.zeros(DIM)
    control = _server(lr=lr, steps=steps, population=len(a))
    states = [RecordDict() for _ in a]
    for r in range(1, rounds + 1):
        ys, changes = [], []
        for k, (ak, bk, state) in enumerate(zip(a, b, states, strict=True)):
            c = control.record()
            correction = torch.zeros(DIM)
            if scaffold:
                correction = delta_from_arrayrecord(begin_round(c, control.accepted.get(k, 0), state))["y"]
            y, mean_step, _ = _quadratic_round(x, ak, bk, correction, lr, steps)
            if scaffold:
                end_round(c, delta_to_arrayrecord({"y": mean_step}), r, state)
            if not dropped(r, k):
                ys.append(y)
                changes.append((k, control.change({"y": x}, {"y": y}, 1)))
        x = torch.stack(ys).mean(0) if ys else x  # a round without replies keeps the global x
        if scaffold:
            control.fold(r, changes)
    return x


A = [torch.tensor([1.0, 0.2, 2.0]), torch.tensor([0.2, 2.0, 0.5]), torch.tensor([1.5, 1.0, 0.1])]
B = [torch.tensor([3.0, -1.0, 0.0]), torch.tensor([-2.0, 2.0, 1.0]), torch.tensor([0.0, 0.5, -3.0])]
OPTIMUM = sum(ai * bi for ai, bi in zip(A, B, strict=True)) / sum(A)  # argmin of the mean objective


def test_scaffold_removes_the_client_drift_fedavg_stalls_at_on_heterogeneous_quadratics():
    fedavg = _federate(A, B, scaffold=False, rounds=200, steps=20, lr=0.1)
    scaffold = _federate(A, B, scaffold=True, rounds=200, steps=20, lr=0.1)
    assert float((fedavg - OPTIMUM).norm()) > 0.3  # FedAvg's fixed point with many local steps is biased
    assert float((scaffold - OPTIMUM).norm()) < 1e-3


def test_lost_replies_do_not_bias_scaffold():
    """A lost reply's change is neither folded into c nor committed by its client, so c stays the
    mean of the c_i and the run still reaches the optimum."""
    lost = _federate(A, B, scaffold=True, rounds=300, steps=20, lr=0.1,
                     dropped=lambda r, k: r % 3 == k or r == 2)
    assert float((lost - OPTIMUM).norm()) < 1e-3


def test_drift_correction_refuses_a_correction_of_another_shape():
    y = torch.nn.Parameter(torch.zeros(DIM))
    spec = DeltaSpec.of_delta({"y": y.detach()})
    with pytest.raises(Exception, match="drift correction"):
        DriftCorrection({"y": y}, {"y": torch.zeros(DIM + 1)}, 0.1, spec)
    with pytest.raises(Exception, match="drift correction"):
        DriftCorrection({"y": y}, {"y": torch.tensor([float("nan")] * DIM)}, 0.1, spec)


# --- the strategy: what it sends, what it folds ------------------------------------------------------------------

SPEC_DELTA = OrderedDict(a=torch.zeros(2, 3), b=torch.zeros(4))
NODES = (1, 2, 3, 4)
TRAIN = TrainConfig(learning_rate=0.5, local_steps=2)


class Grid:
    def get_node_ids(self):
        return list(NODES)


def _strategy(name="fedavg", **kwargs):
    strategy = build_strategy(name, spec=DeltaSpec.of_delta(SPEC_DELTA), max_delta_bytes=10_000, min_train_nodes=4,
                              min_available_nodes=4, fraction_evaluate=0.0, scaffold=TRAIN, **kwargs)
    sent = list(strategy.configure_train(1, delta_to_arrayrecord(SPEC_DELTA), ConfigRecord(), Grid()))
    return strategy, sent


def _reply(node: int, value: float, extra: ArrayRecord | None = None) -> Message:
    metrics = MetricRecord({k: (10 if k == "num-examples" else 1 if k == "unit-weight" else 0.5) for k in TRAIN_METRIC_KEYS})
    delta = OrderedDict((k, torch.full_like(v, value)) for k, v in SPEC_DELTA.items())
    content = RecordDict({"arrays": delta_to_arrayrecord(delta), "metrics": metrics})
    if extra is not None:
        content["fedpeft-scaffold-dc"] = extra
    request = Message(content=RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="train")
    return Message(content, reply_to=request)


def test_every_train_message_carries_c_and_its_nodes_accepted_round(flower_task_identity):
    strategy, sent = _strategy()
    assert len(sent) == 4 and all(SERVER_CONTROL_KEY in m.content.array_records for m in sent)
    c = delta_from_arrayrecord(sent[0].content.array_records[SERVER_CONTROL_KEY])
    assert list(c) == list(SPEC_DELTA) and all(not t.any() for t in c.values())
    assert all(m.content.config_records[ACCEPTED_KEY]["accepted-round"] == 0 for m in sent)
    one = record_bytes(delta_to_arrayrecord(SPEC_DELTA))  # float32 delta: c costs as much again
    assert strategy.traffic[1].bytes_down == 4 * 2 * one
    strategy.aggregate_train(1, [_reply(n, -float(n)) for n in (1, 2, 3)])
    again = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, delta_to_arrayrecord(SPEC_DELTA),
                                                                          ConfigRecord(), Grid())}
    assert {n: m.content.config_records[ACCEPTED_KEY]["accepted-round"] for n, m in again.items()} == {1: 1, 2: 1, 3: 1, 4: 0}


def test_an_accepted_round_moves_c_by_the_derived_changes(flower_task_identity):
    strategy, _ = _strategy()
    arrays, _ = strategy.aggregate_train(1, [_reply(n, -float(n)) for n in NODES])
    assert arrays is not None and strategy.traffic[1].accepted == 4
    # change_n = (0 - (-n)) / (2 * 0.5) - 0 = n; c = 4/4 * mean(1..4)
    torch.testing.assert_close(strategy.control.value["a"], torch.full((2, 3), 2.5))


@pytest.mark.parametrize("case", ["refused", "clipped", "old client"])
def test_a_refused_or_clipped_reply_is_not_folded_into_c(flower_task_identity, case):
    from fedpeft.server.robust import RobustSettings

    kwargs = {"clip_update_norm": 5.0} if case == "clipped" else {}
    if case == "refused":
        kwargs["robust"] = RobustSettings(max_abs_value=50.0)
    strategy, _ = _strategy(**kwargs)
    bad = {"refused": _reply(4, 100.0), "clipped": _reply(4, 3.0),
           "old client": _reply(4, 1.0, delta_to_arrayrecord(SPEC_DELTA))}[case]
    strategy.aggregate_train(1, [*(_reply(n, -1.0) for n in NODES[:3]), bad])
    traffic = strategy.traffic[1]
    assert traffic.accepted == (4 if case == "clipped" else 3) and traffic.clipped == (case == "clipped")
    torch.testing.assert_close(strategy.control.value["a"], torch.full((2, 3), 0.75))  # 3/4 * mean of three 1s
    assert strategy.control.accepted == {1: 1, 2: 1, 3: 1}  # node 4 keeps its old c_i


def test_a_refused_aggregate_leaves_c_and_the_accepted_rounds_untouched(flower_task_identity):
    from fedpeft.server.robust import RobustSettings

    strategy, _ = _strategy("fedavgm", options={"server_learning_rate": "1e33"},
                            robust=RobustSettings(max_abs_value=0.0, norm_bound_ratio=0.0, examples_ratio=0.0))
    replies = [_reply(n, 1e6) for n in NODES]  # each finite; FedAvgM's server step overflows float32
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is None and all(not t.any() for t in strategy.control.value.values())
    assert strategy.control.accepted == {}


@pytest.mark.parametrize("name, kwargs", [("fedmedian", {}), ("krum", {}),
                                          ("fedavg", {"lora_svd_scaling": 2.0})])
def test_scaffold_refuses_what_does_not_average_full_deltas(name, kwargs):
    with pytest.raises(ConfigError, match="SCAFFOLD"):
        build_strategy(name, spec=DeltaSpec.of_delta(SPEC_DELTA), max_delta_bytes=10_000, scaffold=TRAIN, **kwargs)
