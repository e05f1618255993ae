"""peft-bench-attack: the malicious-client mods on synthetic messages, and a tiny end-to-end matrix."""

from __future__ import annotations

import csv
import math
import random
from collections import OrderedDict

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedpeft.common.protocol.flower_io import delta_from_arrayrecord, delta_to_arrayrecord
from fedpeft.common.protocol.plan import TRAIN_METRIC_KEYS
from fedpeft.simulations.bench.attacks import (
    ATTACK_NAMES,
    DEFENSE_NAMES,
    AttackRow,
    defense_table,
    read_results,
    write_results,
)
from fedpeft.simulations.harness.attacks import ATTACKS, INFLATE_FACTOR, AttackMod, attack_mods

SENT = OrderedDict(a=torch.tensor([[0.5, -1.0, 2.0], [0.25, 0.0, 1.5]]), b=torch.tensor([0.125, -0.75]),
                   steps=torch.tensor([3], dtype=torch.int64))
UPDATE = OrderedDict(a=torch.tensor([[0.01, -0.02, 0.03], [0.0, 0.5, -0.25]]), b=torch.tensor([-0.0625, 0.001]),
                     steps=torch.tensor([0], dtype=torch.int64))
HONEST = OrderedDict((k, SENT[k] + UPDATE[k]) for k in SENT)
EXAMPLES = 37


def _metrics() -> MetricRecord:
    return MetricRecord({k: (EXAMPLES if k == "num-examples" else 1 if k == "unit-weight" else 0.5)
                         for k in TRAIN_METRIC_KEYS})


def _request(message_type: str = MessageType.TRAIN) -> Message:
    content = RecordDict({"arrays": delta_to_arrayrecord(SENT), "config": ConfigRecord({"server-round": 1})})
    return Message(content=content, dst_node_id=7, message_type=message_type)


def _context(partition: int) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": partition, "num-partitions": 4},
                   state=RecordDict(), run_config={})


def _honest_client(msg: Message, context: Context) -> Message:
    if msg.metadata.message_type == MessageType.QUERY:
        return Message(RecordDict({"partition": ConfigRecord({"partition-id": 0})}), reply_to=msg)
    return Message(RecordDict({"arrays": delta_to_arrayrecord(HONEST), "metrics": _metrics()}), reply_to=msg)


def _attacked(attack: str, partition: int = 1, message_type: str = MessageType.TRAIN) -> Message:
    return AttackMod(attack, malicious=[1, 3])(_request(message_type), _context(partition), _honest_client)


def _delta(reply: Message) -> OrderedDict:
    return delta_from_arrayrecord(reply.content.array_records["arrays"])


@pytest.mark.parametrize(("attack", "factor"), [("scale1e3", 1e3), ("scale1e6", 1e6), ("signflip", -1.0)])
def test_update_is_scaled_or_negated(flower_task_identity, attack, factor):
    reply = _attacked(attack)
    delta = _delta(reply)
    for name in ("a", "b"):
        update = HONEST[name].double() - SENT[name].double()  # what the client really sent, in float32
        assert delta[name].dtype == torch.float32
        torch.testing.assert_close(delta[name], (SENT[name].double() + factor * update).float(), rtol=0, atol=0)
        torch.testing.assert_close((delta[name].double() - SENT[name].double()) / factor, update,
                                   rtol=1e-6, atol=1e-9)
    assert torch.equal(delta["steps"], HONEST["steps"])  # integer tensors are left alone
    assert reply.content.metric_records["metrics"]["num-examples"] == EXAMPLES


def test_inflate_multiplies_num_examples_and_keeps_the_delta(flower_task_identity):
    reply = _attacked("inflate")
    examples = reply.content.metric_records["metrics"]["num-examples"]
    assert examples == EXAMPLES * INFLATE_FACTOR and isinstance(examples, int)
    assert reply.content.metric_records["metrics"]["unit-weight"] == 1
    assert all(torch.equal(v, HONEST[k]) for k, v in _delta(reply).items())


def test_nan_poisons_every_floating_tensor(flower_task_identity):
    delta = _delta(_attacked("nan"))
    assert all(bool(torch.isnan(delta[k]).any()) for k in ("a", "b"))
    assert torch.equal(delta["steps"], HONEST["steps"])
    finite = torch.isfinite(delta["a"])
    assert torch.equal(delta["a"][finite], HONEST["a"][finite])


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_honest_partitions_and_queries_pass_through(flower_task_identity, attack):
    for partition in (0, 2):  # not in malicious=[1, 3]
        reply = _attacked(attack, partition=partition)
        assert all(torch.equal(v, HONEST[k]) for k, v in _delta(reply).items())
        assert reply.content.metric_records["metrics"]["num-examples"] == EXAMPLES
    query = _attacked(attack, partition=1, message_type=MessageType.QUERY)
    assert set(query.content.config_records) == {"partition"} and not query.content.array_records


def test_error_replies_and_unknown_attacks(flower_task_identity):
    from flwr.app import Error

    from fedpeft.common.errors import ConfigError

    def failing(msg, context):
        return Message(Error(code=1, reason="client crashed"), reply_to=msg)

    reply = AttackMod("scale1e6", [0])(_request(), _context(0), failing)
    assert reply.has_error()
    with pytest.raises(ConfigError, match="unknown attack"):
        AttackMod("explode", [0])
    assert attack_mods("clean", [0]) == [] and len(attack_mods("nan", [0, 1])) == 1
    assert set(ATTACK_NAMES) == {"clean", *ATTACKS}


def test_defense_table_is_valid_run_spec_overrides():
    from fedpeft.server.federation.flags import spec_from_flags

    base = spec_from_flags(clients=10, quantize="none")
    for malicious in (1, 2):
        table = defense_table(malicious)
        assert set(table) == set(DEFENSE_NAMES) and table["default"] == {}
        specs = {name: base.with_overrides(overrides, driver="simulation") for name, overrides in table.items()}
        assert specs["none"].federation.strategy == "fedavg" and not specs["none"].robust.needs_updates
        assert specs["normbound"].robust.norm_bound_ratio > 1
        assert specs["median"].federation.strategy == "fedmedian"
        assert specs["trimmed"].federation.strategy == "fedtrimmedavg"
        assert specs["krum"].federation.strategy_options == {"num_malicious_nodes": malicious}


def test_results_table_csv_and_plot(tmp_path):
    def row(attack, defense, acc, rejected=0, done=3):
        return AttackRow(attack, defense, acc, 0.5, done, 3, 4.0, 30.0, 30 - rejected, rejected, 0.2,
                         "ok" if done == 3 else "stopped: x")

    rows = [row("clean", "none", 0.80), row("clean", "median", 0.78), row("scale1e6", "none", 0.50),
            row("scale1e6", "median", 0.77), row("nan", "none", 0.79, rejected=3, done=2)]
    table = write_results(rows, tmp_path, "test")
    assert "| scale1e6 | 0.500 (-0.300) | 0.770 (-0.010) |" in table
    assert "| nan | 0.790 (-0.010) ⚠ 2/3 | - |" in table
    assert "| scale1e6 | median | 0.770 | -0.010 | -0.030 |" in table
    with (tmp_path / "results.csv").open() as fh:
        written = list(csv.DictReader(fh))
    assert written[3]["delta_vs_clean_same_defense"] == "-0.0100" and written[3]["delta_vs_clean_none"] == "-0.0300"
    assert read_results(tmp_path / "results.csv") == rows
    assert (tmp_path / "results.png").stat().st_size > 0


def test_a_finished_run_is_reused_only_with_the_same_settings(tmp_path):
    import json
    from dataclasses import asdict

    from fedpeft.common.errors import ConfigError
    from fedpeft.server.federation.flags import spec_from_flags
    from fedpeft.simulations.bench.attacks import run_one

    spec = spec_from_flags(clients=10, quantize="none")
    row = AttackRow("nan", "none", 0.7, 0.6, 3, 3, 5.0, 40.0, 27, 3, 1.5)
    run_dir = tmp_path / "nan-none"
    run_dir.mkdir()
    settings = {"attack": "nan", "malicious": [0], "spec": json.loads(json.dumps(spec.to_dict()))}
    (run_dir / "bench-row.json").write_text(json.dumps({"row": asdict(row), "settings": settings}))
    assert run_one(spec, "nan", "none", [0], run_dir) == row  # no simulation started
    with pytest.raises(ConfigError, match="other settings"):
        run_one(spec.with_overrides({"federation.rounds": 4}), "nan", "none", [0], run_dir)
    with pytest.raises(ConfigError, match="other settings"):
        run_one(spec, "nan", "none", [0, 1], run_dir)


# ---- end to end: a tiny BERT, 4 clients, 2 rounds ------------------------------------------------

def _write_sentiment(path, rows: int, seed: int) -> None:
    rng = random.Random(seed)
    good, bad = ["good", "great", "fine", "nice", "happy"], ["bad", "awful", "poor", "sad", "broken"]
    lines = ["sentence\tlabel"]
    for _ in range(rows):
        label = rng.randint(0, 1)
        words = rng.choices(good if label else bad, k=3) + rng.choices(["the", "movie", "was", "plot"], k=2)
        rng.shuffle(words)
        lines.append(f"{' '.join(words)}\t{label}")
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_tiny_attack_matrix_end_to_end(tmp_path):
    from tiny_models import build_tiny_bert

    from fedpeft.simulations.bench.attacks import main

    model = build_tiny_bert(tmp_path / "bert")
    _write_sentiment(tmp_path / "train.tsv", 160, seed=1)
    _write_sentiment(tmp_path / "dev.tsv", 32, seed=2)
    out = tmp_path / "bench"
    assert main(["--model", str(model), "--data", str(tmp_path / "train.tsv"), "--eval-data", str(tmp_path / "dev.tsv"),
                 "--attacks", "scale1e6", "--defenses", "none,median", "--clients", "4", "--rounds", "2",
                 "--local-steps", "2", "--batch-size", "8", "--train-limit", "0", "--eval-limit", "0",
                 "--out", str(out)]) == 0
    for name in ("results.csv", "results.md", "results.png"):
        assert (out / name).stat().st_size > 0
    rows = {(r.attack, r.defense): r for r in read_results(out / "results.csv")}
    table = (out / "results.md").read_text()
    assert set(rows) == {(a, d) for a in ("clean", "scale1e6") for d in ("none", "median")}, table
    assert all(r.rounds_done == 2 and r.rejected == 0 and r.accepted == 8 for a, r in rows.items() if a[0] == "clean"), table
    # under plain FedAvg one client's x1e6 update drags the global adapter ~1e6/4 times as far
    # as the clean federation moved; the coordinate-wise median keeps it at the clean scale
    clean_none, clean_median = rows[("clean", "none")].update_norm, rows[("clean", "median")].update_norm
    assert rows[("scale1e6", "none")].update_norm > 1e3 * clean_none, table
    assert rows[("scale1e6", "median")].update_norm < 3 * clean_median, table
    assert rows[("scale1e6", "median")].rounds_done == 2, table
    assert all(math.isfinite(r.update_norm) and r.update_norm > 0 for r in rows.values()), table
