"""Flower's in-memory LinkState with each node's pending messages indexed, for the Simulation Engine.

Flower 1.41's Simulation Engine has a thread that, every 0.1 s, asks the LinkState for one
pending message per virtual node (`vce_api.add_messages_to_queue`), and
`InMemoryLinkState.get_message_ins(node_id, ...)` finds a node's messages by scanning
*every* stored message, re-validating each (expiry, federation membership) under the
state's lock. A round that sends N clients one message each therefore costs O(N²)
validations per poll pass, repeated until the round ends: with 200 virtual clients it was
45% of the coordinator process's CPU samples (py-spy), competing for the same cores as
the clients it waits for, and holding the lock replies need to be stored.

`IndexedInMemoryLinkState` keeps, per destination node, the ids of its undelivered
messages (in the order they were stored), so a poll looks at that node's messages only.
What it returns, validates and marks delivered is what Flower's method does for the same
state: the same messages in the same order, the same expiry and federation checks on
each candidate, the same `delivered_at` stamp. Only the incidental re-validation of other
nodes' messages is skipped; theirs are validated when their own node polls (and by
Flower's reply-side checks).

One more difference: Flower's full scan also deletes *delivered* messages whose time to live
has passed (and their late replies); the index never revisits a delivered message, so those
stay until the round deletes them as usual. Flower's default TTL is 12 h and fedpeft sets
none shorter, so this matters only for rounds longer than that.

Written by hand because Flower's `run_simulation` has no hook to choose its LinkState; it
is swapped in for the duration of one simulation by `indexed_link_state()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from flwr.app import Message
from flwr.server.superlink.linkstate import linkstate_factory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.date import now


class _PendingIndexedStore(dict):  # type: ignore[type-arg]
    """`message_ins_store` that also indexes undelivered message ids by destination node.

    Flower adds to the store with `store[id] = msg` and removes with `del store[id]`; both
    keep the index. A message leaves the index when it is delivered (`drop_pending`)."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[int, dict[str, None]] = {}

    def __setitem__(self, message_id: str, message: Message) -> None:
        super().__setitem__(message_id, message)
        if message.metadata.delivered_at == "":
            self.pending.setdefault(message.metadata.dst_node_id, {})[message_id] = None

    def __delitem__(self, message_id: str) -> None:
        message = self[message_id]
        super().__delitem__(message_id)
        self.drop_pending(message.metadata.dst_node_id, message_id)

    def pop(self, message_id: str, *default: Any) -> Any:
        if message_id in self:
            message = self[message_id]
            del self[message_id]
            return message
        if default:
            return default[0]
        raise KeyError(message_id)

    def clear(self) -> None:
        super().clear()
        self.pending.clear()

    def _unindexed(self, *_args: Any, **_kwargs: Any) -> Any:
        raise NotImplementedError("the indexed message store supports item assignment, del, pop and clear only "
                                  "(what Flower 1.41 uses); a newer Flower must be checked against it")

    update = setdefault = popitem = __ior__ = _unindexed  # type: ignore[assignment]

    def drop_pending(self, node_id: int, message_id: str) -> None:
        ids = self.pending.get(node_id)
        if ids is not None:
            ids.pop(message_id, None)
            if not ids:
                del self.pending[node_id]


class IndexedInMemoryLinkState(InMemoryLinkState):
    """`InMemoryLinkState` whose `get_message_ins` looks only at the node's own pending messages."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.message_ins_store = _PendingIndexedStore()

    def get_message_ins(self, node_id: int, limit: int | None, *, run_id: int | None = None) -> list[Message]:
        """Flower's `get_message_ins` (same checks, order and marking) over the node's pending ids."""
        if limit is not None and limit < 1:
            raise AssertionError("`limit` must be >= 1")
        store = self.message_ins_store
        found: list[Message] = []
        found_ids: list[str] = []
        with self.lock:
            for message_id in list(store.pending.get(node_id, ())):
                self._check_stored_messages({message_id})  # expiry and federation, as Flower checks each
                message = store.get(message_id)
                if message is None:  # deleted without passing through the store's own methods
                    store.drop_pending(node_id, message_id)
                elif (message.metadata.dst_node_id == node_id
                        and (run_id is None or message.metadata.run_id == run_id)
                        and message.metadata.delivered_at == ""):
                    found.append(message)
                    found_ids.append(message_id)
                if limit and len(found) == limit:
                    break
            delivered_at = now().isoformat()
            for message_id, message in zip(found_ids, found, strict=True):
                message.metadata.delivered_at = delivered_at
                store.drop_pending(node_id, message_id)  # by the key it is stored under
        return found


@contextlib.contextmanager
def indexed_link_state() -> Iterator[None]:
    """Makes Flower's LinkState factory build `IndexedInMemoryLinkState` for in-memory state."""
    original = linkstate_factory.InMemoryLinkState
    linkstate_factory.InMemoryLinkState = IndexedInMemoryLinkState  # type: ignore[misc]
    try:
        yield
    finally:
        linkstate_factory.InMemoryLinkState = original  # type: ignore[misc]
