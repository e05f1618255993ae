"""A Flower `Grid` that hands training replies to the strategy as they are pulled.

Flower's grids collect every reply of a round into a list before `aggregate_train` sees
any of them, so the coordinator holds all N replies at once. This wrapper pushes the
round's messages the same way and returns a generator that pulls replies as the nodes
deliver them: a strategy that folds each reply and drops it (`DeltaValidation` for the
FedAvg family) then holds one reply at a time. Written by hand because Flower 1.41's
grids only offer the collecting `send_and_receive`; it uses nothing but their public
`push_messages` / `pull_messages`, so it works over the simulation's in-memory grid and
the deployment's gRPC grid alike. Evaluation rounds (whose replies are small metrics)
go through the wrapped grid unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

PULL_INTERVAL_S = 0.05
"""First wait after a pull that found no reply (Flower's in-memory grid waits 0.1 s)."""
MAX_PULL_INTERVAL_S = 3.0
"""Longest wait between pulls while nothing arrives (Flower's gRPC grid waits 3 s)."""


class StreamingGrid(Grid):
    """`grid`, with training replies yielded as they arrive instead of returned as a list."""

    def __init__(self, grid: Grid, pull_interval: float = PULL_INTERVAL_S) -> None:
        self.grid = grid
        self.pull_interval = pull_interval

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages or any(m.metadata.message_type != MessageType.TRAIN for m in messages):
            return self.grid.send_and_receive(messages, timeout=timeout)
        pending = set(self.grid.push_messages(messages))
        del messages
        # The deadline runs from the push, as in Flower's grids, not from the first pull.
        return self._replies(pending, None if timeout is None else time.time() + timeout)

    def _replies(self, pending: set[str], deadline: float | None) -> Iterator[Message]:
        """Replies to `pending` as they are pulled, until all came or the deadline passed; one
        last pull after it, so a reply that arrived while the strategy was folding is kept."""
        wait = self.pull_interval
        while pending:
            last = deadline is not None and time.time() >= deadline
            replies = list(self.grid.pull_messages(pending))
            pending.difference_update(reply.metadata.reply_to_message_id for reply in replies)
            wait = self.pull_interval if replies else min(wait * 2, MAX_PULL_INTERVAL_S)  # back off while idle
            while replies:
                yield replies.pop(0)  # the grid keeps no reference: a folded reply can be freed
            if last:
                return
            if pending and not replies:
                time.sleep(wait if deadline is None else max(0.0, min(wait, deadline - time.time())))
