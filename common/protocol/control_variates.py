"""SCAFFOLD's control variates on the wire and in a client's Flower state; torch-free.

The server sends its control variate c beside the global delta (`SERVER_CONTROL_KEY`)
and, per node, the last round whose control variate change it folded into c
(`ACCEPTED_KEY`). A client keeps its own c_i in Flower's `Context.state` (kept by Flower
between a node's rounds, in simulation and deployment alike), trains with the correction
c - c_i (`fedpeft.common.training.scaffold`) and keeps c_i+ = c_i - c + m as *pending*
(m: the round's mean step). Its reply carries only the delta: the server derives the
same change, m - c, from the delta it validated (`fedpeft.server.scaffold`), so the
change is held to every bound the delta is. The pending c_i+ becomes the client's c_i
only when the server says it folded that round's change in; a reply the server refused
(or never received) leaves c_i as it was, which keeps c the mean of the clients' c_i.

Both the simulation's ClientApp and the deployment's torch-free forwarder call
`begin_round` and `end_round`, so the bookkeeping is one piece of code. All control
variates are float32. A client whose state holds no c_i (its first round, a restarted
node, another run's tensors) starts from c_i = 0, the paper's initialisation.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

SERVER_CONTROL_KEY = "fedpeft-scaffold-c"
"""Train message: the server's control variate c (an ArrayRecord named like the delta)."""
ACCEPTED_KEY = "fedpeft-scaffold"
"""Train message: ConfigRecord {"accepted-round": the last round whose change of this node's
c_i the server folded into c (0: none)}."""
ACCEPTED_ROUND = "accepted-round"
CLIENT_CONTROL_KEY = "fedpeft-scaffold-ci"
"""Client state: the client's committed control variate c_i."""
PENDING_CONTROL_KEY = "fedpeft-scaffold-ci-pending"
"""Client state: c_i+ of the client's last round, until the server confirms or drops it."""
PENDING_ROUND_KEY = "fedpeft-scaffold-pending"
"""Client state: ConfigRecord {"round": the round the pending c_i+ belongs to}."""


def _arrays(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((name, np.asarray(array.numpy(), dtype=np.float32)) for name, array in record.items())


def _record(arrays: OrderedDict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((name, Array(np.ascontiguousarray(a, dtype=np.float32))) for name, a in arrays.items()))


def _matches(arrays: OrderedDict[str, np.ndarray], server: OrderedDict[str, np.ndarray]) -> bool:
    return list(arrays) == list(server) and all(arrays[n].shape == c.shape for n, c in server.items())


def accepted_round(message_records: RecordDict) -> int:
    """The accepted round the server sent (0 when it sent none); a malformed one raises ValueError."""
    record = message_records.config_records.get(ACCEPTED_KEY)
    value = record.get(ACCEPTED_ROUND, 0) if record is not None else 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"message from server: {ACCEPTED_KEY}.{ACCEPTED_ROUND} must be an integer >= 0, got {value!r}")
    return value


def _settle(state: RecordDict, accepted: int) -> None:
    """Commit the pending c_i+ if the server folded its round in; drop it either way."""
    pending = state.array_records.get(PENDING_CONTROL_KEY)
    tag = state.config_records.get(PENDING_ROUND_KEY)
    if pending is not None and tag is not None and tag.get("round") == accepted:
        state[CLIENT_CONTROL_KEY] = pending
    for key in (PENDING_CONTROL_KEY, PENDING_ROUND_KEY):
        if key in state:
            del state[key]


def _own_control(state: RecordDict, server: OrderedDict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """The client's committed c_i, or zeros where it has none of the server's tensors and shapes."""
    kept = state.array_records.get(CLIENT_CONTROL_KEY)
    own = _arrays(kept) if kept is not None else OrderedDict()
    return own if _matches(own, server) else OrderedDict((n, np.zeros_like(c)) for n, c in server.items())


def begin_round(server_control: ArrayRecord, accepted: int, state: RecordDict) -> ArrayRecord:
    """Settle the last round's pending c_i+ against `accepted`; return c - c_i, what this
    round's local steps are corrected by."""
    _settle(state, accepted)
    server = _arrays(server_control)
    own = _own_control(state, server)
    return _record(OrderedDict((n, c - own[n]) for n, c in server.items()))


def end_round(server_control: ArrayRecord, mean_step: ArrayRecord, server_round: int, state: RecordDict) -> None:
    """Keep c_i+ = c_i - c + m (option II of the paper) as pending for `server_round`."""
    server, step = _arrays(server_control), _arrays(mean_step)
    if not _matches(step, server):
        raise ValueError("the trainer's mean step does not match the server's control variate")
    own = _own_control(state, server)
    state[PENDING_CONTROL_KEY] = _record(OrderedDict((n, own[n] - c + step[n]) for n, c in server.items()))
    state[PENDING_ROUND_KEY] = ConfigRecord({"round": int(server_round)})
