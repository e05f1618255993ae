"""A federated round of a split (SplitFed) client: load the global client-part delta, train
against the split server, reply with the client part's delta for FedAvg.

Same contract as `fedpeft.client.app.train_round` (same reply arrays and metric keys), so
the server's strategy, checks and checkpoints are unchanged. Each worker process keeps its
loaded client part (only the first `cut` blocks) between rounds and virtual clients.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from fedpeft.client.split_client import SplitSession, split_channel, train_split_local
from fedpeft.client.training import TrainConfig, reply_metrics
from fedpeft.common.data.records import Record
from fedpeft.common.errors import ConfigError, DeltaError
from fedpeft.common.model.base_model import load_tokenizer, model_fingerprint
from fedpeft.common.model.quantization import validate_quantize
from fedpeft.common.model.split import ClientPart, SplitConfig, load_client_part
from fedpeft.common.protocol.flower_io import delta_from_arrayrecord, delta_to_arrayrecord, record_bytes
from fedpeft.common.protocol.plan import FederationPlan
from fedpeft.common.wire.split import wire_dtype

log = logging.getLogger("fedpeft.client.split")
MAX_GLOBAL_DELTA_BYTES = 512 * 1024 * 1024

_WORKER_PARTS: dict[tuple, tuple[ClientPart, object]] = {}


def _client_part(model_dir: str, quantize: str, plan: FederationPlan) -> tuple[ClientPart, object, float]:
    """The worker's cached client part and tokenizer for this plan (loaded the first time only)."""
    split = SplitConfig(cut=int(plan.split["cut"]), u_shaped=bool(plan.split.get("u_shaped", False)))
    key = (model_dir, quantize, split, plan.method, repr(sorted(plan.method_options.items())))
    if key in _WORKER_PARTS:
        part, tokenizer = _WORKER_PARTS[key]
        return part, tokenizer, 0.0
    if plan.model_fingerprint != model_fingerprint(Path(model_dir)):
        raise ConfigError(f"server trains base model {plan.model_fingerprint}, but this client has "
                          f"{model_fingerprint(Path(model_dir))} at {model_dir}")
    _WORKER_PARTS.clear()
    start = time.perf_counter()
    part = load_client_part(Path(model_dir), split, plan.method_config(), quantize=validate_quantize(quantize),
                            seed=plan.seed, method=plan.method)
    tokenizer = load_tokenizer(Path(model_dir))
    _WORKER_PARTS[key] = (part, tokenizer)
    return part, tokenizer, time.perf_counter() - start


def split_train_round(model_dir: str, quantize: str, split_server: str | None, split_ca: str | None,
                      plan: FederationPlan, arrays: ArrayRecord | None, rows: list[Record], *, server_round: int,
                      partition: int, client_id: str) -> tuple[ArrayRecord, dict[str, float]]:
    """Train this client's part for one round against the split server; the reply's delta and metrics."""
    if not split_server:
        raise ConfigError("this run trains with the split topology, but the client knows no split server "
                          "(peft-client --split-server HOST:PORT)")
    if arrays is None:
        raise DeltaError("message from server carries no global delta")
    part, tokenizer, load_seconds = _client_part(model_dir, quantize, plan)
    start = time.perf_counter()
    part.set_delta(delta_from_arrayrecord(arrays, MAX_GLOBAL_DELTA_BYTES), source="global client-part delta from server")
    swap_seconds = time.perf_counter() - start
    task = plan.task_spec()
    label = f"client {partition} round {server_round}"
    task.check_rows(rows, f"client {partition} local data")
    config = TrainConfig(**plan.train)
    with split_channel(split_server, Path(split_ca) if split_ca else None) as channel:
        session = SplitSession(channel, part, client_id, plan.model_fingerprint,
                               dtype=wire_dtype(str(plan.split.get("wire_dtype", "bfloat16"))), round=server_round,
                               token=plan.split.get("token"))
        try:
            stats = train_split_local(part, session, task, tokenizer, rows, config, label=label,
                                      seed=plan.seed * 1_000_003 + server_round * 1009 + int(partition))
        finally:
            session.close()
    reply = delta_to_arrayrecord({k: v.to(torch.float32) for k, v in part.get_delta().items()})
    sent = record_bytes(reply)
    log.info("%s: %d examples, loss %.4f -> %.4f, split wire %.2f MB up / %.2f MB down, sending %.2f MB delta",
             label, len(rows), stats.first_loss, stats.last_loss, stats.bytes_up / 1e6, stats.bytes_down / 1e6, sent / 1e6)
    metrics = reply_metrics(len(rows), stats, load_seconds, swap_seconds, sent)
    return reply, metrics
