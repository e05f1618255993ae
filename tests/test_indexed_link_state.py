"""The simulation's indexed LinkState answers every poll exactly as Flower's InMemoryLinkState does."""

from __future__ import annotations

import contextlib
import random
import secrets

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import HEARTBEAT_INTERVAL_INF, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID, SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
from flwr.server.superlink.linkstate import LinkStateFactory, linkstate_factory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState, RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.date import now
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from fedpeft.simulations.indexed_link_state import IndexedInMemoryLinkState, indexed_link_state

RUN_ID, TASK_ID = 7, 11


def _state(indexed: bool, nodes: int) -> tuple[InMemoryLinkState, InMemoryGrid, list[int]]:
    """A LinkState set up as Flower's run_simulation and Simulation Engine set theirs up."""
    with indexed_link_state() if indexed else contextlib.nullcontext():
        factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
        state = factory.state()
    assert isinstance(state, IndexedInMemoryLinkState) == indexed
    run = Run.create_empty(run_id=RUN_ID)
    run.primary_task_id = TASK_ID
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[RUN_ID] = RunRecord(run=run)
    state.task_store[TASK_ID] = Task(task_id=TASK_ID, run_id=RUN_ID)
    node_ids = []
    for _ in range(nodes):
        node_id = state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, secrets.token_bytes(32),
                                    heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        state.acknowledge_node_heartbeat(node_id=node_id, heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        node_ids.append(node_id)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, node_ids


def _message(dst: int, tag: int) -> Message:
    return Message(RecordDict({"c": ConfigRecord({"tag": tag})}), dst_node_id=dst, message_type="train")


def _expired(message: Message) -> bool:
    return message.metadata.created_at + message.metadata.ttl <= now().timestamp()


def _by_tag(state: InMemoryLinkState) -> dict[int, Message]:
    return {_tags([m])[0]: m for m in state.message_ins_store.values()}


def _tags(messages: list[Message]) -> list[int]:
    return [int(m.content.config_records["c"]["tag"]) for m in messages]


@pytest.mark.parametrize("seed", range(6))
def test_polls_return_the_same_messages_in_the_same_order_as_flowers_state(flower_task_identity, seed):
    flower_task_identity.run_id, flower_task_identity.node_id = RUN_ID, SUPERLINK_NODE_ID  # as the ServerApp's
    rng = random.Random(seed)
    delivered = expired = 0
    plain, plain_grid, plain_nodes = _state(False, 5)
    indexed, indexed_grid, indexed_nodes = _state(True, 5)
    tag = 0
    for _ in range(60):
        action = rng.random()
        node = rng.randrange(5)
        if action < 0.4:  # the ServerApp pushes messages, several to one node at times
            count = rng.randint(1, 4)
            targets = [rng.choice([node, (node + 1) % 5]) for _ in range(count)]
            for grid, nodes in ((plain_grid, plain_nodes), (indexed_grid, indexed_nodes)):
                ids = list(grid.push_messages([_message(nodes[t], tag + i) for i, t in enumerate(targets)]))
                assert all(ids)
            tag += count
        elif action < 0.5:  # a stored message's time to live runs out
            plain_tags, indexed_tags = _by_tag(plain), _by_tag(indexed)
            if plain_tags:
                victim = rng.choice(sorted(plain_tags))
                for message in (plain_tags[victim], indexed_tags[victim]):
                    message.metadata.created_at -= message.metadata.ttl + 1
                expired += 1
        elif action < 0.9:  # the engine polls one node
            limit = rng.choice([1, 1, 2, None])
            got_plain = plain.get_message_ins(node_id=plain_nodes[node], limit=limit)
            got_indexed = indexed.get_message_ins(node_id=indexed_nodes[node], limit=limit)
            assert _tags(got_indexed) == _tags(got_plain)
            assert all(m.metadata.delivered_at for m in got_indexed)
            delivered += len(got_plain)
        else:  # Flower deletes messages (delivered ones once their replies are pulled)
            plain_tags, indexed_tags = _by_tag(plain), _by_tag(indexed)
            gone = rng.sample(sorted(plain_tags), rng.randint(0, min(2, len(plain_tags))))
            plain.delete_messages({plain_tags[t].metadata.message_id for t in gone})
            indexed.delete_messages({indexed_tags[t].metadata.message_id for t in gone})
            if rng.random() < 0.5:  # and a message that only the index still holds (expired, unscanned)
                extra = sorted(indexed_tags.keys() - plain_tags.keys())
                indexed.delete_messages({indexed_tags[t].metadata.message_id for t in extra[:1]})
        # Flower also drops other nodes' expired messages while it scans; the index leaves
        # them until their own node polls: the stores differ by expired messages only
        plain_tags, indexed_tags = _by_tag(plain), _by_tag(indexed)
        assert plain_tags.keys() <= indexed_tags.keys()
        assert all(_expired(indexed_tags[t]) for t in indexed_tags.keys() - plain_tags.keys())
    for i in range(5):  # drain: whatever is left pending comes out the same
        assert _tags(indexed.get_message_ins(node_id=indexed_nodes[i], limit=None)) == _tags(
            plain.get_message_ins(node_id=plain_nodes[i], limit=None))
    assert not indexed.message_ins_store.pending
    assert delivered >= 10 and expired >= 2  # the comparison saw real traffic


def test_the_factory_is_restored_after_the_simulation():
    with indexed_link_state():
        assert linkstate_factory.InMemoryLinkState is IndexedInMemoryLinkState
    assert linkstate_factory.InMemoryLinkState is InMemoryLinkState
    with pytest.raises(RuntimeError), indexed_link_state():
        raise RuntimeError("a failed run")
    assert linkstate_factory.InMemoryLinkState is InMemoryLinkState


def test_a_limit_below_one_is_refused_as_by_flower(flower_task_identity):
    flower_task_identity.run_id, flower_task_identity.node_id = RUN_ID, SUPERLINK_NODE_ID
    indexed, _, nodes = _state(True, 1)
    with pytest.raises(AssertionError):
        indexed.get_message_ins(node_id=nodes[0], limit=0)


@pytest.mark.parametrize(("env", "expected"), [(None, IndexedInMemoryLinkState), ("1", InMemoryLinkState)])
def test_simulations_run_on_the_indexed_state_unless_the_baseline_is_asked_for(monkeypatch, env, expected):
    """What `run_flower_simulation` hands Flower: the indexed state, or Flower's own for the benchmark baseline."""
    import flwr.simulation

    from fedpeft.simulations import ray_runtime

    seen = []
    monkeypatch.setattr(ray_runtime, "ray_backend", lambda _args: contextlib.nullcontext())
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **_kw: seen.append(linkstate_factory.InMemoryLinkState))
    if env is None:
        monkeypatch.delenv(ray_runtime.FLOWER_LINK_STATE_ENV, raising=False)
    else:
        monkeypatch.setenv(ray_runtime.FLOWER_LINK_STATE_ENV, env)
    ray_runtime.run_flower_simulation(server_app=None, client_app=None, num_supernodes=1, backend_config={})
    assert seen == [expected] and linkstate_factory.InMemoryLinkState is InMemoryLinkState


def test_store_methods_that_would_bypass_the_index_fail_loudly():
    from fedpeft.simulations.indexed_link_state import _PendingIndexedStore

    store = _PendingIndexedStore()
    for call in (lambda: store.update({}), lambda: store.setdefault("k", None), lambda: store.popitem()):
        with pytest.raises(NotImplementedError):
            call()
