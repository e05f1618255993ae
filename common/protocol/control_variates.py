"""SCAFFOLD's control variates on the wire and in a client's Flower state; torch-free.

The server sends its control variate c beside the global delta (`SERVER_CONTROL_KEY`);
a client keeps its own c_i in Flower's `Context.state` (`CLIENT_CONTROL_KEY`, kept by
Flower between a node's rounds in simulation and deployment alike), trains with the
correction c - c_i (`fedpeft.common.training.scaffold`) and replies with c_i+ - c_i
(`CONTROL_DELTA_KEY`) beside its delta. Both the simulation's ClientApp and the
deployment's torch-free forwarder call these two functions, so the bookkeeping is one
piece of code. All control variates are float32.

A client whose state holds no c_i (its first round, a restarted node, another run's
tensors) starts from c_i = 0, the paper's initialisation.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

SERVER_CONTROL_KEY = "fedpeft-scaffold-c"
"""Train message: the server's control variate c (an ArrayRecord named like the delta)."""
CONTROL_DELTA_KEY = "fedpeft-scaffold-dc"
"""Train reply: c_i+ - c_i, the change of the client's control variate."""
CLIENT_CONTROL_KEY = "fedpeft-scaffold-ci"
"""Client state: the client's own control variate c_i."""


def _arrays(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((name, np.asarray(array.numpy(), dtype=np.float32)) for name, array in record.items())


def _record(arrays: OrderedDict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((name, Array(np.ascontiguousarray(a, dtype=np.float32))) for name, a in arrays.items()))


def _own_control(state: RecordDict, server: OrderedDict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """The client's c_i from its state, or zeros where it has none of the server's tensors and shapes."""
    kept = state.array_records.get(CLIENT_CONTROL_KEY)
    own = _arrays(kept) if kept is not None else OrderedDict()
    if list(own) != list(server) or any(own[n].shape != c.shape for n, c in server.items()):
        return OrderedDict((n, np.zeros_like(c)) for n, c in server.items())
    return own


def drift_correction(server_control: ArrayRecord, state: RecordDict) -> ArrayRecord:
    """c - c_i: what the client's local steps are corrected by."""
    server = _arrays(server_control)
    own = _own_control(state, server)
    return _record(OrderedDict((n, c - own[n]) for n, c in server.items()))


def update_own_control(server_control: ArrayRecord, mean_step: ArrayRecord, state: RecordDict) -> ArrayRecord:
    """Store c_i+ = c_i - c + m in `state` (m: the local round's mean step, option II of the
    paper) and return c_i+ - c_i = m - c, what the reply carries."""
    server = _arrays(server_control)
    step = _arrays(mean_step)
    if list(step) != list(server) or any(step[n].shape != c.shape for n, c in server.items()):
        raise ValueError("the trainer's mean step does not match the server's control variate")
    own = _own_control(state, server)
    change = OrderedDict((n, step[n] - c) for n, c in server.items())
    state[CLIENT_CONTROL_KEY] = _record(OrderedDict((n, own[n] + change[n]) for n in server))
    return _record(change)
