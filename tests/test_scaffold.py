"""SCAFFOLD over PEFT deltas: the paper's updates, its fix of client drift, and its checks.

The quadratic tests drive the real pieces (the local loop `run_steps` with
`DriftCorrection`, the client's Flower-state bookkeeping `control_variates`, the server's
`ServerControl`) on f_i(y) = 1/2 sum a_i (y - b_i)^2, where everything is known in closed
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
    CLIENT_CONTROL_KEY,
    CONTROL_DELTA_KEY,
    SERVER_CONTROL_KEY,
    drift_correction,
    update_own_control,
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


@settings(max_examples=60, deadline=None)
@given(c=vectors, ci=vectors, m=vectors)
def test_the_clients_state_holds_ci_plus_and_the_reply_carries_its_change(c, ci, m):
    state = RecordDict({CLIENT_CONTROL_KEY: _record(ci.numpy())})
    correction = drift_correction(_record(c.numpy()), state)
    np.testing.assert_allclose(correction["y"].numpy(), (c - ci).numpy(), rtol=1e-6, atol=1e-6)
    change = update_own_control(_record(c.numpy()), _record(m.numpy()), state)
    np.testing.assert_allclose(change["y"].numpy(), (m - c).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state.array_records[CLIENT_CONTROL_KEY]["y"].numpy(), (ci - c + m).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_a_client_without_its_own_control_variate_starts_from_zero():
    c = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    other_run = RecordDict({CLIENT_CONTROL_KEY: ArrayRecord(OrderedDict(z=Array(np.ones(7, np.float32))))})
    for state in (RecordDict(), other_run):
        np.testing.assert_array_equal(drift_correction(_record(c), state)["y"].numpy(), c)


def test_the_server_control_variate_moves_by_the_sampled_fraction_of_the_mean_change():
    control = ServerControl(DeltaSpec.of_delta({"y": torch.zeros(DIM)}))
    changes = [{"y": torch.tensor([1.0, 2.0, 3.0])}, {"y": torch.tensor([3.0, 2.0, 1.0])}]
    control.update(changes, population=4)  # c += |S|/N * mean = 2/4 * [2, 2, 2]
    torch.testing.assert_close(control.value["y"], torch.tensor([1.0, 1.0, 1.0]))
    np.testing.assert_array_equal(delta_from_arrayrecord(control.record())["y"].numpy(), [1.0, 1.0, 1.0])


def _federate(a: list[torch.Tensor], b: list[torch.Tensor], scaffold: bool, rounds: int, steps: int, lr: float) -> torch.Tensor:
    """Full-participation rounds of FedAvg (unweighted) with or without SCAFFOLD, through the real pieces."""
    x = torch.zeros(DIM)
    control = ServerControl(DeltaSpec.of_delta({"y": x}))
    states = [RecordDict() for _ in a]
    for _ in range(rounds):
        ys, changes = [], []
        for ai, bi, state in zip(a, b, states, strict=True):
            c = control.record()
            correction = delta_from_arrayrecord(drift_correction(c, state))["y"] if scaffold else torch.zeros(DIM)
            y, mean_step, _ = _quadratic_round(x, ai, bi, correction, lr, steps)
            ys.append(y)
            if scaffold:
                changes.append(delta_from_arrayrecord(update_own_control(c, delta_to_arrayrecord({"y": mean_step}),
                                                                         state)))
        x = torch.stack(ys).mean(0)
        control.update(changes, population=len(a))
    return x


def test_scaffold_removes_the_client_drift_fedavg_stalls_at_on_heterogeneous_quadratics():
    a = [torch.tensor([1.0, 0.2, 2.0]), torch.tensor([0.2, 2.0, 0.5]), torch.tensor([1.5, 1.0, 0.1])]
    b = [torch.tensor([3.0, -1.0, 0.0]), torch.tensor([-2.0, 2.0, 1.0]), torch.tensor([0.0, 0.5, -3.0])]
    optimum = sum(ai * bi for ai, bi in zip(a, b, strict=True)) / sum(a)  # argmin of the mean objective
    fedavg = _federate(a, b, scaffold=False, rounds=200, steps=20, lr=0.1)
    scaffold = _federate(a, b, scaffold=True, rounds=200, steps=20, lr=0.1)
    assert float((fedavg - optimum).norm()) > 0.3  # FedAvg's fixed point with many local steps is biased
    assert float((scaffold - optimum).norm()) < 1e-3


def test_drift_correction_refuses_a_correction_of_another_shape():
    y = torch.nn.Parameter(torch.zeros(DIM))
    spec = DeltaSpec.of_delta({"y": y.detach()})
    with pytest.raises(Exception, match="drift correction"):
        DriftCorrection({"y": y}, {"y": torch.zeros(DIM + 1)}, 0.1, spec)
    with pytest.raises(Exception, match="drift correction"):
        DriftCorrection({"y": y}, {"y": torch.tensor([float("nan")] * DIM)}, 0.1, spec)


def test_frozen_tensors_of_the_delta_get_no_correction():
    frozen = torch.nn.Parameter(torch.ones(DIM), requires_grad=False)
    spec = DeltaSpec.of_delta({"f": frozen.detach()})
    drift = DriftCorrection({"f": frozen}, {"f": torch.ones(DIM)}, 0.5, spec)
    drift.after_step()
    torch.testing.assert_close(frozen.detach(), torch.ones(DIM))
    torch.testing.assert_close(drift.mean_step()["f"], torch.zeros(DIM))


# --- the server's checks of the control variate a reply carries ---------------------------------------------------

SPEC_DELTA = OrderedDict(a=torch.zeros(2, 3), b=torch.zeros(4))
NODES = (1, 2, 3, 4)


class Grid:
    def get_node_ids(self):
        return list(NODES)


def _strategy(name="fedavg", **kwargs):
    strategy = build_strategy(name, spec=DeltaSpec.of_delta(SPEC_DELTA), max_delta_bytes=10_000, min_train_nodes=4,
                              min_available_nodes=4, fraction_evaluate=0.0, scaffold=True, **kwargs)
    sent = list(strategy.configure_train(1, delta_to_arrayrecord(SPEC_DELTA), ConfigRecord(), Grid()))
    return strategy, sent


def _reply(node: int, value: float, change: object = "same") -> Message:
    metrics = MetricRecord({k: (10 if k == "num-examples" else 1 if k == "unit-weight" else 0.5) for k in TRAIN_METRIC_KEYS})
    delta = OrderedDict((k, torch.full_like(v, value)) for k, v in SPEC_DELTA.items())
    content = RecordDict({"arrays": delta_to_arrayrecord(delta), "metrics": metrics})
    if change == "same":
        change = OrderedDict((k, torch.full_like(v, value, dtype=torch.float32)) for k, v in SPEC_DELTA.items())
    if change is not None:
        content[CONTROL_DELTA_KEY] = change if isinstance(change, ArrayRecord) else delta_to_arrayrecord(change)
    request = Message(content=RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="train")
    return Message(content, reply_to=request)


def test_every_train_message_carries_the_server_control_variate(flower_task_identity):
    strategy, sent = _strategy()
    assert len(sent) == 4 and all(SERVER_CONTROL_KEY in m.content.array_records for m in sent)
    c = delta_from_arrayrecord(sent[0].content.array_records[SERVER_CONTROL_KEY])
    assert list(c) == list(SPEC_DELTA) and all(not t.any() for t in c.values())
    one = record_bytes(delta_to_arrayrecord(SPEC_DELTA))  # float32 delta: c costs as much again
    assert strategy.traffic[1].bytes_down == 4 * 2 * one


def test_an_accepted_round_moves_c_by_the_mean_change_of_the_accepted_replies(flower_task_identity):
    strategy, _ = _strategy()
    arrays, _ = strategy.aggregate_train(1, [_reply(n, float(n)) for n in NODES])
    assert arrays is not None and strategy.traffic[1].accepted == 4
    torch.testing.assert_close(strategy.control.value["a"], torch.full((2, 3), 2.5))  # 4/4 * mean(1..4)


BAD_CHANGES = {
    "missing": None,
    "NaN": OrderedDict(a=torch.full((2, 3), float("nan")), b=torch.zeros(4)),
    "huge": OrderedDict(a=torch.full((2, 3), 1e9), b=torch.zeros(4)),
    "wrong shape": OrderedDict(a=torch.zeros(3, 2), b=torch.zeros(4)),
    "wrong dtype": OrderedDict(a=torch.zeros(2, 3, dtype=torch.float64), b=torch.zeros(4, dtype=torch.float64)),
    "extra tensor": OrderedDict(a=torch.zeros(2, 3), b=torch.zeros(4), c=torch.zeros(1)),
    "oversized": ArrayRecord(OrderedDict(a=Array(np.zeros(20_000, np.float32)))),
}


@pytest.mark.parametrize("case", list(BAD_CHANGES))
def test_a_bad_control_variate_change_costs_only_its_own_reply(flower_task_identity, case):
    strategy, _ = _strategy()
    arrays, _ = strategy.aggregate_train(1, [*(_reply(n, 1.0) for n in NODES[:3]), _reply(4, 100.0, BAD_CHANGES[case])])
    traffic = strategy.traffic[1]
    assert traffic.accepted == 3 and len(traffic.rejected) == 1 and "node 4" in traffic.rejected[0]
    assert torch.equal(delta_from_arrayrecord(arrays)["a"], torch.ones(2, 3))  # the honest mean alone
    torch.testing.assert_close(strategy.control.value["a"], torch.full((2, 3), 0.75))  # 3/4 * 1, node 4 not in it


def test_a_refused_aggregate_leaves_c_untouched(flower_task_identity):
    from fedpeft.server.robust import RobustSettings

    strategy, _ = _strategy("fedavgm", options={"server_learning_rate": "10"},
                            robust=RobustSettings(max_abs_value=0.0, norm_bound_ratio=0.0, examples_ratio=0.0))
    replies = [_reply(n, 3e38) for n in NODES]  # each finite; FedAvgM's server step overflows float32
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is None and all(not t.any() for t in strategy.control.value.values())


@pytest.mark.parametrize("name, kwargs", [("fedmedian", {}), ("krum", {}),
                                          ("fedavg", {"lora_svd_scaling": 2.0})])
def test_scaffold_refuses_what_does_not_average_full_deltas(name, kwargs):
    with pytest.raises(ConfigError, match="SCAFFOLD"):
        build_strategy(name, spec=DeltaSpec.of_delta(SPEC_DELTA), max_delta_bytes=10_000, scaffold=True, **kwargs)
