"""A client trains LoRA at the rank the server assigns it, and takes a downlink at that rank only."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from fedpeft.client import app as client_app
from fedpeft.common.data.builtin_task import builtin_task
from fedpeft.common.errors import ConfigError, DeltaError
from fedpeft.common.methods import make_config
from fedpeft.common.model.base_model import model_fingerprint
from fedpeft.common.protocol.flower_io import delta_to_arrayrecord
from fedpeft.common.protocol.plan import FederationPlan
from fedpeft.server.lora_aggregation import lora_pairs


def _plan(model_dir, method="lora", options=None) -> FederationPlan:
    config = make_config(method, options if options is not None else {"r": "8", "target_modules": "q_proj"})
    return FederationPlan(run_name="t", model_fingerprint=model_fingerprint(model_dir), method=method,
                          method_options=config.to_dict(), task=builtin_task().to_dict(),
                          train={"learning_rate": 1e-3, "local_steps": 8}, seed=0)


def _message(plan: FederationPlan, delta, rank) -> tuple:
    """What the client app hands `receive_plan` for a train message at `rank`."""
    return plan.to_json(), delta_to_arrayrecord(delta), rank


def _lora_delta(rank: int, out_f: int, in_f: int, names: list[str]) -> OrderedDict:
    return OrderedDict((n, torch.randn(rank, in_f) if ".lora_A." in n else torch.randn(out_f, rank)) for n in names)


def test_client_builds_lora_at_its_assigned_rank_and_takes_a_downlink_at_it(tiny_model_dir, flower_task_identity):
    setup = client_app.ClientSetup(model_dir=str(tiny_model_dir), quantize="none", data=lambda ctx: [])
    plan = _plan(tiny_model_dir)
    full = client_app._adapted_model(setup, plan, plan.method_options)[0].get_delta()
    (a_name, b_name), *_ = lora_pairs(list(full))
    out_f, in_f = full[b_name].shape[0], full[a_name].shape[1]
    downlink = _lora_delta(2, out_f, in_f, list(full))
    _, adapted, _, _ = client_app.receive_plan(setup, *_message(plan, downlink, rank=2))
    assert adapted.config.r == 2 and adapted.config.alpha == plan.method_options["alpha"]
    got = adapted.get_delta()
    assert all(torch.equal(got[k], downlink[k]) for k in downlink)  # the rank-2 downlink is what it trains from
    with pytest.raises(DeltaError, match=r"shape \(8, "):
        client_app.receive_plan(setup, *_message(plan, full, rank=2))  # a rank-8 downlink is refused at rank 2
    _, again, _, _ = client_app.receive_plan(setup, *_message(plan, full, rank=None))  # no rank: the plan's own
    assert again.config.r == 8
    assert client_app.receive_plan(setup, *_message(plan, downlink, rank=2))[1] is adapted  # cached per rank


def test_assigned_ranks_are_validated(tiny_model_dir):
    plan = _plan(tiny_model_dir)
    assert client_app.assigned_options(plan, 4)["r"] == 4
    assert client_app.assigned_options(plan, None) == plan.method_options
    for bad in (0, 9, True, "4"):
        with pytest.raises(ConfigError, match="must be an integer in \\[1, 8\\]"):
            client_app.assigned_options(plan, bad)
    with pytest.raises(ConfigError, match="without a rank"):
        client_app.assigned_options(_plan(tiny_model_dir, "ia3", {}), 4)
