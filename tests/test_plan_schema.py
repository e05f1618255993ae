"""The client checks the federation plan it is sent against a typed schema: a malformed plan
is refused with one ConfigError naming every bad field, never a TypeError or KeyError."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpeft.client import app as client_app
from fedpeft.client.training import TrainConfig
from fedpeft.common.data.builtin_task import builtin_task
from fedpeft.common.data.records import TaskSpec
from fedpeft.common.errors import ConfigError, DataError
from fedpeft.common.methods import available_methods, get_method, make_config
from fedpeft.common.model.split import SplitConfig
from fedpeft.common.protocol.plan import PLAN_KEY, FederationPlan
from fedpeft.common.wire.split import wire_dtype
from fedpeft.server.federation.spec import RunSpec

SPLIT_ENTRY = {"cut": 2, "u_shaped": True, "wire_dtype": "bfloat16", "token": "secret-token"}
"""What the split topology's `plan_entry` sends (server/split_run.py)."""


def _server_plan(method: str = "lora", options: dict | None = None, *, training: dict | None = None,
                 task: TaskSpec | None = None, split: dict | None = None, seed: int = 0) -> FederationPlan:
    """A plan built the way the server builds it (server/app.py `run_federation`, from the run
    spec as server/federation/assembly.py reads it)."""
    spec = RunSpec.from_dict({"federation": {"method": method, "method_options": options or {}, "seed": seed},
                              "training": training or {}})
    method_config = make_config(spec.federation.method, spec.method_options())
    return FederationPlan(run_name="run", model_fingerprint="0123abcd", method=spec.federation.method,
                          method_options=method_config.to_dict(), task=(task or builtin_task()).to_dict(),
                          train=dict(spec.train_config().plan_fields()), seed=spec.federation.seed, frozen_fingerprint="",
                          split=split or {})


def _mutated(plan: FederationPlan, change) -> str:
    data = json.loads(plan.to_json())
    change(data)
    return json.dumps(data)


def _refusal(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        FederationPlan.from_json(text)
    message = str(info.value)
    assert message.startswith("malformed federation plan from server:")
    return message


# ---- (1) the regression: an empty task was a KeyError deep in TaskSpec.from_dict ---------------------

def test_empty_task_is_refused_naming_its_kind():
    message = _refusal(_mutated(_server_plan(), lambda d: d.update(task={})))
    assert "plan.task.kind: missing" in message


def test_task_from_dict_names_the_missing_key_instead_of_a_key_error():
    with pytest.raises(DataError, match="task.kind: missing"):
        TaskSpec.from_dict({})


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda d: d["train"].update(learning_rate=math.inf), "plan.train.learning_rate: must be a finite number > 0 (got inf)"),
    (lambda d: d.update(seed="x"), 'plan.seed: expected an integer, got "x"'),
    (lambda d: d.update(seed=True), "plan.seed: expected an integer, got true"),
    (lambda d: d.update(seed=2**40), "plan.seed: must be an integer in [0, 4294967295]"),
    (lambda d: d.update(method="foo"), "plan.method: unknown PEFT method 'foo'"),
    (lambda d: d.update(method=["lora"]), 'plan.method: expected a string, got ["lora"]'),
    (lambda d: d.update(surprise=1), "plan: unknown key(s) ['surprise']"),
    (lambda d: d.pop("model_fingerprint"), "plan.model_fingerprint: missing"),
    (lambda d: d.update(model_fingerprint=None), "plan.model_fingerprint: expected a string, got null"),
    (lambda d: d["train"].update(lr=0.1), "plan.train: unknown key(s) ['lr']"),
    (lambda d: d["train"].update(batch_size="8"), 'plan.train.batch_size: expected an integer, got "8"'),
    (lambda d: d["train"].update(batch_size=0), "plan.train.batch_size: must be an integer in [1, 65536] (got 0)"),
    (lambda d: d.update(train=[]), "plan.train: expected an object, got []"),
    (lambda d: d["method_options"].update(r=0), "plan.method_options: LoraMethodConfig.r: rank must be >= 1"),
    (lambda d: d["method_options"].update(target_modules=3), "plan.method_options: LoraMethodConfig.target_modules"),
    (lambda d: d["method_options"].update(dropout=10**400), "plan.method_options: LoraMethodConfig.dropout"),
    (lambda d: d["task"].update(kind="regression"), "plan.task.kind: expected one of ['instruction', 'classification']"),
    (lambda d: d["task"].update(verbalizer={"0": 1}), "plan.task.verbalizer: expected an object of strings"),
    (lambda d: d.update(split={"u_shaped": True}), "plan.split.cut: missing"),
    (lambda d: d.update(split={"cut": 0}), "plan.split.cut: split cut must be an integer >= 1"),
    (lambda d: d.update(split={"cut": 2, "wire_dtype": "int8"}), "plan.split.wire_dtype: split wire dtype 'int8'"),
    (lambda d: d.update(split={"cut": 2, "u_shaped": "yes"}), 'plan.split.u_shaped: expected a boolean (true/false), got "yes"'),
])
def test_each_bad_field_is_named(change, fragment):
    assert fragment in _refusal(_mutated(_server_plan(), change))


def test_every_problem_is_reported_at_once():
    def change(d):
        d.update(seed="x", method_options=[], task={"kind": "instruction", "template": 3})
        d["train"]["learning_rate"] = -1
    message = _refusal(_mutated(_server_plan(), change))
    for fragment in ("plan.seed:", "plan.method_options:", "plan.task.template:", "plan.train.learning_rate:"):
        assert fragment in message


@pytest.mark.parametrize("text", ["", "[1", "[]", "null", "1" * 5000, "[" * 100_000, b"\xff"])
def test_text_that_is_no_plan_object_is_refused(text):
    _refusal(text)


# ---- (2) what the server sends round-trips --------------------------------------------------------

def _default_methods() -> list[str]:
    """Every method whose default options build (a few need options no default can give)."""
    names = []
    for name in available_methods():
        try:
            make_config(name, {})
        except ConfigError:
            continue
        names.append(name)
    return names


@pytest.mark.parametrize("method", _default_methods())
def test_a_plan_as_the_server_builds_it_round_trips(method):
    plan = _server_plan(method)
    again = FederationPlan.from_json(plan.to_json())
    assert again == plan
    assert again.method_config() == plan.method_config()
    assert again.train_config() == TrainConfig().for_method(method)
    assert again.train_config().learning_rate == get_method(method).federated_learning_rate


def test_split_classification_and_adalora_plans_round_trip():
    task = TaskSpec(kind="classification", template="Review: {text}\nSentiment:", label_column="label",
                    verbalizer={"0": "negative", "1": "positive"})
    plans = [
        _server_plan(task=task, split=SPLIT_ENTRY, seed=2**32 - 1,
                     training={"learning_rate": 1e-2, "local_epochs": 0.5, "gradient_checkpointing": True}),
        _server_plan("adalora", {"total_step": 40, "init_r": 6, "target_r": 4}),
        _server_plan("lora", {"r": 16, "layers_to_transform": "0,1", "freeze_a": True}),
    ]
    for plan in plans:
        again = FederationPlan.from_json(plan.to_json())
        assert again == plan and again.task_spec() == plan.task_spec() and again.train_config() == plan.train_config()
    assert FederationPlan.from_json(plans[0].to_json()).train_config().gradient_checkpointing


def test_older_plans_without_optional_fields_are_read():
    data = json.loads(_server_plan().to_json())
    for key in ("frozen_fingerprint", "split"):
        del data[key]
    data["train"] = {"learning_rate": 1e-3, "local_steps": 8}  # every other training setting has a default
    plan = FederationPlan.from_json(json.dumps(data))
    assert plan.split == {} and plan.train_config() == TrainConfig(learning_rate=1e-3, local_steps=8)
    # but the learning rate and the step count are the server's to resolve, never the client's to guess
    for key in ("learning_rate", "local_steps"):
        data["train"] = {"learning_rate": 1e-3, "local_steps": 8}
        del data["train"][key]
        with pytest.raises(ConfigError, match=f"plan.train.{key}: missing"):
            FederationPlan.from_json(json.dumps(data))


# ---- (3) property: any mutation is a valid plan or a ConfigError ----------------------------------

BASES = [
    _server_plan(),
    _server_plan(split=SPLIT_ENTRY, training={"local_epochs": 1.0}),
    _server_plan("ia3", task=TaskSpec(kind="classification", template="{text}", verbalizer={"0": "no", "1": "yes"})),
    _server_plan("bottleneck", {"style": "parallel", "scaling": 2.0}),
    _server_plan("adalora", {"total_step": 40}),
]

SCALARS = (st.none() | st.booleans() | st.integers() | st.sampled_from([0, -1, 1, 2**31, 2**32, 2**64, 10**400, -(10**400)])
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
           | st.sampled_from(["", "lora", "instruction", "classification", "bfloat16", "q_proj,v_proj", "16", "true"]))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def _paths(value, prefix=()):
    """Every (nested) key path of a plan's JSON form."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*prefix, key)
            yield from _paths(item, (*prefix, key))


@st.composite
def mutated_plans(draw) -> str:
    data = json.loads(draw(st.sampled_from(BASES)).to_json())
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(data))
        path = draw(st.sampled_from(paths))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["drop", "replace", "replace", "add"]))
        if action == "drop":
            del parent[path[-1]]
        elif action == "replace":
            parent[path[-1]] = draw(JSON_VALUES)
        elif isinstance(parent[path[-1]], dict):  # a key the schema does not know, or one it does
            known = ["kind", "r", "cut", "token", "learning_rate", "u_shaped", "verbalizer", "seed", "split"]
            parent[path[-1]][draw(st.sampled_from(known) | st.text(max_size=6))] = draw(JSON_VALUES)
    return json.dumps(data)  # NaN/Infinity as Python's json writes them


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_plans())
def test_mutated_plans_are_valid_or_refused_with_a_config_error(text):
    try:
        plan = FederationPlan.from_json(text)
    except ConfigError as exc:
        assert str(exc).startswith("malformed federation plan from server:")
        return
    # Accepted: everything the client builds from the plan builds
    plan.method_config()
    plan.task_spec()
    config = plan.train_config()
    assert config.steps_for(64) >= 1
    assert 0 <= plan.seed <= 2**32 - 1
    if plan.split:
        SplitConfig(cut=plan.split["cut"], u_shaped=plan.split.get("u_shaped", False))
        wire_dtype(plan.split.get("wire_dtype", "bfloat16"))
    if plan.method == "lora":
        assert client_app.assigned_options(plan, 1)["r"] == 1
    assert FederationPlan.from_json(plan.to_json()) == plan


# ---- (4) the client refuses the round, before its data or a model is loaded -----------------------

def _no_model(*args, **kwargs):
    raise AssertionError("a malformed plan must be refused before any model is loaded")


def test_client_refuses_a_malformed_plan_before_loading_anything(monkeypatch, tmp_path, flower_task_identity):
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    monkeypatch.setattr(client_app.AdaptedModel, "load", _no_model)
    monkeypatch.setattr(client_app, "model_fingerprint", _no_model)

    def no_data(context):
        raise AssertionError("a malformed plan must be refused before the local data is read")

    setup = client_app.ClientSetup(model_dir=str(tmp_path / "no-model"), quantize="none", data=no_data)
    bad = _mutated(_server_plan(), lambda d: d.update(task={}))
    msg = Message(RecordDict({"config": ConfigRecord({PLAN_KEY: bad, "server-round": 1})}), dst_node_id=7,
                  message_type="train")
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    with pytest.raises(ConfigError, match=r"malformed federation plan from server: plan\.task\.kind: missing"):
        client_app.handle_train(setup, msg, context)
    # The deployment trainer's path (`peft-client`): the same refusal, which it turns into INVALID_ARGUMENT
    with pytest.raises(ConfigError, match=r"plan\.task\.kind: missing"):
        client_app.client_round(setup, bad, None, [], server_round=1, partition=0, proximal_mu=0.0, lora_rank=None,
                                client_id="c0")
    with pytest.raises(ConfigError, match=r"plan\.split\.cut: missing"):
        client_app.client_round(setup, _mutated(_server_plan(), lambda d: d.update(split={"wire_dtype": "float16"})),
                                None, [], server_round=1, partition=0, proximal_mu=0.0, lora_rank=None, client_id="c0")


def test_handle_train_refuses_bad_round_settings_by_name(monkeypatch, tmp_path, flower_task_identity):
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    monkeypatch.setattr(client_app.AdaptedModel, "load", _no_model)
    setup = client_app.ClientSetup(model_dir=str(tmp_path / "no-model"), quantize="none", data=lambda ctx: [])
    msg = Message(RecordDict({"config": ConfigRecord({PLAN_KEY: _server_plan().to_json(), "server-round": "one"})}),
                  dst_node_id=7, message_type="train")
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    with pytest.raises(ConfigError, match="server-round must be an integer"):
        client_app.handle_train(setup, msg, context)
