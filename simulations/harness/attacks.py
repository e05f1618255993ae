"""Malicious clients for the attack benchmark (`peft-bench-attack`): Flower ClientApp mods.

Each attack is a mod that lets the honest client train as usual and then rewrites its
TRAIN reply, on the malicious partition ids only (`context.node_config["partition-id"]`);
every other message (queries) and every honest partition passes through untouched. The
reply carries the client's full delta (the global delta it was sent plus its update) in
the ArrayRecord "arrays" and its metrics (with "num-examples") in the MetricRecord
"metrics"; the update is the reply's delta minus the global delta of the request.

- `scale1e3`, `scale1e6`: the update multiplied by 1e3 / 1e6 (model replacement / boosting);
- `signflip`: the update negated (gradient-ascent direction at the honest magnitude);
- `inflate`: num-examples multiplied by 1e4 (FedAvg weight hijacking; the delta is honest);
- `nan`: NaN written into every floating tensor of the delta (a poisoned or broken client);
- `adaptive`: an attacker who knows the default reply bounds and stays just inside them:
  the update scaled by -0.9 x `robust.norm_bound_ratio` and num-examples by
  `robust.examples_ratio` - 1 (FedAvg's bounds limit how far one round moves, they do not
  make FedAvg robust: that is what fedmedian, fedtrimmedavg and krum are for).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch
from flwr.app import Context, Message, MessageType, MetricRecord

from fedpeft.common.errors import ConfigError
from fedpeft.common.protocol.flower_io import delta_from_arrayrecord, delta_to_arrayrecord
from fedpeft.common.protocol.plan import PARTITION_KEY, REPLY_ARRAYS_KEY, REPLY_METRICS_KEY, WEIGHT_KEY
from fedpeft.server.robust import RobustSettings

Delta = Mapping[str, torch.Tensor]
INFLATE_FACTOR = 10_000
_DEFAULT_BOUNDS = RobustSettings()
ADAPTIVE_SCALE = -0.9 * _DEFAULT_BOUNDS.norm_bound_ratio
ADAPTIVE_INFLATE = int(_DEFAULT_BOUNDS.examples_ratio) - 1


def scaled_update(sent: Delta, reply: Delta, factor: float) -> dict[str, torch.Tensor]:
    """`sent + factor * (reply - sent)` per floating tensor (computed in float64, stored in the
    reply's dtype); other tensors are kept as the client sent them."""
    out = {}
    for name, value in reply.items():
        if value.is_floating_point() and name in sent:
            base = sent[name].double()
            out[name] = (base + factor * (value.double() - base)).to(value.dtype)
        else:
            out[name] = value
    return out


def with_nan(reply: Delta) -> dict[str, torch.Tensor]:
    """The delta with the first element of every (non-empty) floating tensor set to NaN."""
    out = {}
    for name, value in reply.items():
        value = value.clone()
        if value.is_floating_point() and value.numel():
            value.view(-1)[0] = math.nan
        out[name] = value
    return out


@dataclass(frozen=True)
class Attack:
    """How a malicious client rewrites its reply: delta (given the sent global delta) and/or examples."""

    name: str
    description: str
    delta: Callable[[Delta, Delta], dict[str, torch.Tensor]] | None = None
    """(sent, reply) -> the delta to send instead (None: the honest delta)."""
    examples: Callable[[int], int] | None = None
    """True num-examples -> the count to report instead (None: the true count)."""


ATTACKS: dict[str, Attack] = {a.name: a for a in (
    Attack("scale1e3", "update x 1e3", delta=lambda sent, reply: scaled_update(sent, reply, 1e3)),
    Attack("scale1e6", "update x 1e6", delta=lambda sent, reply: scaled_update(sent, reply, 1e6)),
    Attack("signflip", "update negated", delta=lambda sent, reply: scaled_update(sent, reply, -1.0)),
    Attack("inflate", f"num-examples x {INFLATE_FACTOR:g}", examples=lambda n: int(n) * INFLATE_FACTOR),
    Attack("nan", "NaN in the delta", delta=lambda sent, reply: with_nan(reply)),
    Attack("adaptive", f"update x {ADAPTIVE_SCALE:g} and num-examples x {ADAPTIVE_INFLATE}, inside the default bounds",
           delta=lambda sent, reply: scaled_update(sent, reply, ADAPTIVE_SCALE),
           examples=lambda n: int(n) * ADAPTIVE_INFLATE),
)}


def get_attack(name: str) -> Attack:
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}; choose from {list(ATTACKS)}")
    return ATTACKS[name]


class AttackMod:
    """A ClientApp mod: `attack` on the TRAIN replies of the partitions in `malicious`.

    A class (not a closure) so that Ray pickles it by reference with its two fields.
    """

    def __init__(self, attack: str | Attack, malicious: Collection[int]) -> None:
        self.attack = attack if isinstance(attack, Attack) else get_attack(attack)
        self.malicious = frozenset(int(p) for p in malicious)

    def __repr__(self) -> str:
        return f"AttackMod({self.attack.name!r}, malicious={sorted(self.malicious)})"

    def is_malicious(self, context: Context) -> bool:
        partition = context.node_config.get(PARTITION_KEY)
        return partition is not None and int(partition) in self.malicious

    def __call__(self, msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN or not self.is_malicious(context):
            return call_next(msg, context)
        sent_record = msg.content.array_records.get(REPLY_ARRAYS_KEY)  # the global delta, read before training
        sent = delta_from_arrayrecord(sent_record) if sent_record is not None else {}
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        content = reply.content
        if self.attack.delta is not None:
            delta = delta_from_arrayrecord(content.array_records[REPLY_ARRAYS_KEY])
            content[REPLY_ARRAYS_KEY] = delta_to_arrayrecord(self.attack.delta(sent, delta))
        if self.attack.examples is not None:
            metrics = dict(content.metric_records[REPLY_METRICS_KEY])
            metrics[WEIGHT_KEY] = self.attack.examples(int(metrics[WEIGHT_KEY]))  # type: ignore[arg-type]
            content[REPLY_METRICS_KEY] = MetricRecord(metrics)  # type: ignore[arg-type]
        return reply


def attack_mods(attack: str, malicious: Collection[int]) -> list[AttackMod]:
    """The ClientApp mods of one benchmark run ("clean": none)."""
    return [] if attack == "clean" else [AttackMod(attack, malicious)]
