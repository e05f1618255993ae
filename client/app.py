"""The Flower ClientApp: receive the global delta, train locally, return only the delta.

Each simulation worker (a Ray actor process) keeps the loaded 4-bit base model with its
PEFT modules in `_WORKER_MODEL` and reuses it for every virtual client it runs: a new
client or round only swaps the delta's tensors in (`set_delta`), it never reloads the
base. The per-message cost of that swap is reported as `swap-seconds`.

With heterogeneous LoRA ranks the server names this client's rank in the train config
(`RANK_KEY`); the client builds LoRA at that rank (at most the plan's) and its downlink
and reply are at that rank. A worker keeps one model per rank it has served, so
switching between virtual clients of different ranks does not reload the base.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedpeft.client.training import reply_metrics, train_local
from fedpeft.common.data.records import Record
from fedpeft.common.errors import ConfigError, DeltaError
from fedpeft.common.logs import setup_logging
from fedpeft.common.methods import make_config
from fedpeft.common.model.adapted import AdaptedModel
from fedpeft.common.model.base_model import model_fingerprint
from fedpeft.common.model.quantization import validate_quantize
from fedpeft.common.protocol.control_variates import SERVER_CONTROL_KEY, accepted_round, begin_round, end_round
from fedpeft.common.protocol.flower_io import delta_from_arrayrecord, delta_to_arrayrecord, record_bytes
from fedpeft.common.protocol.plan import (
    PLAN_KEY,
    RANK_KEY,
    REPLY_ARRAYS_KEY,
    REPLY_METRICS_KEY,
    FederationPlan,
)
from fedpeft.common.training.scaffold import DriftCorrection

log = logging.getLogger("fedpeft.client")

DataProvider = Callable[[Context], list[Record]]
MAX_GLOBAL_DELTA_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class ClientSetup:
    """What a client knows locally: where its base model is and how to get its data."""

    model_dir: str
    quantize: str
    data: DataProvider
    torch_threads: int = 1
    split_server: str | None = None
    """HOST:PORT of the split server (runs with the split topology only)."""
    split_ca: str | None = None
    """CA certificate that signed the split server's TLS certificate (None: loopback without TLS)."""


# Loaded models of one worker process, keyed by everything that shapes them.
_WORKER_MODEL: dict[tuple, AdaptedModel] = {}


def assigned_options(plan: FederationPlan, rank: object) -> dict[str, object]:
    """The plan's method options at the server-assigned LoRA `rank` (None: the plan's own)."""
    if rank is None:
        return dict(plan.method_options)
    top = getattr(plan.method_config(), "r", None)  # the typed option: a plan may send r as "8"
    if plan.method != "lora" or not isinstance(top, int):
        raise ConfigError(f"server assigned a LoRA rank, but the plan trains {plan.method!r} without a rank")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= top:
        raise ConfigError(f"server assigned LoRA rank {rank!r}; it must be an integer in [1, {top}]")
    return {**plan.method_options, "r": rank}


def _adapted_model(setup: ClientSetup, plan: FederationPlan, options: dict[str, object]) -> tuple[AdaptedModel, float]:
    """The worker's cached model for this plan and `options` (loading it the first time only)."""
    base_key = (setup.model_dir, setup.quantize, plan.method, plan.task_spec().num_labels)
    key = (*base_key, json.dumps(options, sort_keys=True))
    if key in _WORKER_MODEL:
        return _WORKER_MODEL[key], 0.0
    if plan.model_fingerprint != model_fingerprint(Path(setup.model_dir)):
        raise ConfigError(f"server trains base model {plan.model_fingerprint}, but this client has "
                          f"{model_fingerprint(Path(setup.model_dir))} at {setup.model_dir}")
    for stale in [k for k in _WORKER_MODEL if k[:len(base_key)] != base_key]:
        del _WORKER_MODEL[stale]  # another run's base model; ranks of this run are kept
    adapted = AdaptedModel.load(Path(setup.model_dir), validate_quantize(setup.quantize), plan.method,
                                make_config(plan.method, options), seed=plan.seed, num_labels=plan.task_spec().num_labels)
    if adapted.frozen_fingerprint() != plan.frozen_fingerprint:
        raise ConfigError(f"this client's frozen adapter tensors ({adapted.frozen_fingerprint() or 'none'}) differ from "
                          f"the server's ({plan.frozen_fingerprint or 'none'}): peers must build them from the same seed")
    _WORKER_MODEL[key] = adapted
    return adapted, adapted.load_seconds


class RoundReply(NamedTuple):
    """What one local round sends back: the delta, its metrics and, under SCAFFOLD, the
    round's mean step m (`fedpeft.common.training.scaffold`); None without it."""

    delta: ArrayRecord
    metrics: dict[str, float]
    mean_step: ArrayRecord | None = None


def train_round(setup: ClientSetup, plan: FederationPlan, adapted: AdaptedModel, rows: list[Record], *,
                server_round: int, partition: int, proximal_mu: float, load_seconds: float,
                swap_seconds: float, correction: ArrayRecord | None = None) -> RoundReply:
    """Train `adapted` (already holding the global delta) on `rows`; the reply's delta and metrics.

    Shared by the simulation ClientApp and the long-lived deployment trainer, so both
    train with exactly the same seeds and settings. With `correction` (SCAFFOLD's c - c_i)
    each step is drift-corrected and the reply carries the round's mean step.
    """
    label = f"client {partition} round {server_round}"
    task = plan.task_spec()
    task.check_rows(rows, f"client {partition} local data")
    train_config = plan.train_config()
    drift = None
    if correction is not None:
        assert train_config.learning_rate is not None  # a plan always carries it (plan_problems)
        drift = DriftCorrection(dict(adapted.model.named_parameters()),
                                delta_from_arrayrecord(correction, MAX_GLOBAL_DELTA_BYTES),
                                train_config.learning_rate, adapted.spec)
    stats = train_local(adapted, task, rows, train_config, label=label, proximal_mu=proximal_mu,
                        seed=plan.seed * 1_000_003 + server_round * 1009 + int(partition),
                        step_offset=max(server_round - 1, 0) * train_config.steps_for(len(rows)), drift=drift)
    reply_arrays: ArrayRecord = delta_to_arrayrecord(adapted.get_delta())
    sent = record_bytes(reply_arrays)
    mean_step = delta_to_arrayrecord(drift.mean_step()) if drift is not None else None
    log.info("%s: %d examples, loss %.4f -> %.4f, sending %.2f MB delta", label, len(rows),
             stats.first_loss, stats.last_loss, sent / 1e6)
    metrics = reply_metrics(len(rows), stats, load_seconds, swap_seconds, sent)
    return RoundReply(reply_arrays, metrics, mean_step)


def receive_plan(setup: ClientSetup, plan_json: str | FederationPlan, arrays: ArrayRecord | None,
                 lora_rank: object = None) -> tuple[FederationPlan, AdaptedModel, float, float]:
    """Parse and validate the server's plan (a malformed one raises ConfigError before any
    model is loaded), get the (cached) model for it (at the LoRA rank the server assigned
    this client, if any) and load the global delta into it."""
    plan = _parsed(plan_json)
    setup_logging()
    torch.set_num_threads(setup.torch_threads)
    adapted, load_seconds = _adapted_model(setup, plan, assigned_options(plan, lora_rank))
    if lora_rank is not None:
        log.info("training at LoRA rank %s (assigned by the server)", lora_rank)
    if arrays is None:
        raise DeltaError("message from server carries no global delta")
    start = time.perf_counter()
    adapted.set_delta(delta_from_arrayrecord(arrays, MAX_GLOBAL_DELTA_BYTES), source="global delta from server")
    return plan, adapted, load_seconds, time.perf_counter() - start


def _parsed(plan: str | FederationPlan) -> FederationPlan:
    """The plan, validated (`FederationPlan.from_json`) unless it already is one."""
    if isinstance(plan, FederationPlan):
        return plan
    if not isinstance(plan, str | bytes):
        raise ConfigError(f"malformed federation plan from server: expected JSON text, got a {type(plan).__name__}")
    return FederationPlan.from_json(plan)


def client_round(setup: ClientSetup, plan_json: str | FederationPlan, arrays: ArrayRecord | None, rows: list[Record],
                 *, server_round: int, partition: int, proximal_mu: float, lora_rank: object, client_id: str,
                 correction: ArrayRecord | None = None) -> RoundReply:
    """One client round, whoever runs the client (a simulation worker or `peft-client`'s trainer):
    the plan decides what is trained (the whole model's delta, or the split client part's).
    The plan is validated first: a malformed one raises ConfigError naming its fields.
    `correction`: SCAFFOLD's c - c_i (`fedpeft.common.protocol.control_variates`)."""
    plan = _parsed(plan_json)
    if plan.split:  # SplitFed: only the client part is loaded and trained, against the split server
        from fedpeft.client.split_app import split_train_round

        if correction is not None:
            raise ConfigError("SCAFFOLD drift correction is not supported with the split topology")
        setup_logging()
        torch.set_num_threads(setup.torch_threads)
        return RoundReply(*split_train_round(setup.model_dir, setup.quantize, setup.split_server, setup.split_ca, plan,
                                             arrays, rows, server_round=server_round, partition=partition,
                                             client_id=client_id))
    plan, adapted, load_s, swap_s = receive_plan(setup, plan, arrays, lora_rank)
    return train_round(setup, plan, adapted, rows, server_round=server_round, partition=partition,
                       proximal_mu=proximal_mu, load_seconds=load_s, swap_seconds=swap_s, correction=correction)


def handle_train(setup: ClientSetup, msg: Message, context: Context) -> Message:
    """One Message API train message, handled in this process: plan -> model -> train -> reply."""
    config = msg.content.config_records.get("config")
    if config is None or PLAN_KEY not in config:
        raise ConfigError("message from server carries no federation plan")
    plan = _parsed(config[PLAN_KEY])  # before the data or a model is loaded: a bad plan costs nothing
    server_round = _number(config, "server-round", 0, int)
    proximal_mu = _number(config, "proximal-mu", 0.0, float)  # set by Flower's FedProx
    partition = _number(context.node_config, "partition-id", context.node_id, int)
    server_control = msg.content.array_records.get(SERVER_CONTROL_KEY)
    correction = None
    if server_control is not None:
        try:
            correction = begin_round(server_control, accepted_round(msg.content), context.state)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    reply = client_round(
        setup, plan, msg.content.array_records.get("arrays"), setup.data(context), server_round=server_round,
        partition=partition, proximal_mu=proximal_mu, lora_rank=config.get(RANK_KEY), client_id=f"node-{context.node_id}",
        correction=correction)
    if server_control is not None:
        if reply.mean_step is None:
            raise ConfigError("the server sent a SCAFFOLD control variate, but this round trained without one")
        end_round(server_control, reply.mean_step, server_round, context.state)
    return Message(RecordDict({REPLY_ARRAYS_KEY: reply.delta, REPLY_METRICS_KEY: MetricRecord(reply.metrics)}),
                   reply_to=msg)


def _number(record: object, key: str, default: object, kind: type) -> Any:
    """`record[key]` (or `default`) as an int or float; anything else raises ConfigError naming the key."""
    value = record.get(key, default)  # type: ignore[attr-defined]
    try:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise TypeError
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"message from server: {key} must be {'an integer' if kind is int else 'a number'}, "
                          f"got {value!r:.60}") from None


def build_client_app(setup: ClientSetup, dp: bool = False, mods: Sequence[Mod] = ()) -> ClientApp:
    """A ClientApp bound to one local model location and data provider (simulation); with
    `dp`, Flower's `fixedclipping_mod` clips each update (the server's DP wrapper adds noise).
    `mods` run outside that (the attack benchmark's malicious clients rewrite replies there), inside
    `codec_mod`, which decodes compressed broadcasts and encodes replies (`fedpeft.common.codecs.mod`)."""
    from flwr.clientapp.mod import fixedclipping_mod

    from fedpeft.client.flower_app import partition_query
    from fedpeft.common.codecs.mod import codec_mod

    # The codec mod runs outermost: mods inside it (an attack's, DP's clipping) see plain deltas.
    app = ClientApp(mods=[codec_mod, *mods, *([fixedclipping_mod] if dp else [])])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(setup, msg, context)

    app.query()(partition_query)
    return app
