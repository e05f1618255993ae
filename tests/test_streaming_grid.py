"""Training replies reach the strategy as the nodes deliver them, not as one list."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedpeft.server.streaming_grid import StreamingGrid


class TrickleGrid(Grid):
    """A grid whose nodes answer one message per pull (a stand-in only for the transport)."""

    def __init__(self) -> None:
        self.outbox: list[Message] = []
        self.pulls = 0

    def set_run(self, run: Run) -> None: ...

    @property
    def run(self) -> Run:
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content, dst_node_id, message_type)

    def get_node_ids(self) -> Iterable[int]:
        return [1, 2, 3]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            self.outbox.append(msg)
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        wanted = set(message_ids)
        for msg in list(self.outbox):
            if msg.metadata.message_id in wanted:
                self.outbox.remove(msg)
                return [Message(RecordDict({"c": ConfigRecord({"n": msg.metadata.dst_node_id})}), reply_to=msg)]
        return []

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        raise AssertionError("a training round must not be collected into a list")


def _train_messages(kind: str = MessageType.TRAIN) -> list[Message]:
    return [Message(RecordDict(), node, kind) for node in (1, 2, 3)]


def test_train_replies_are_yielded_one_pull_at_a_time(flower_task_identity):
    inner = TrickleGrid()
    replies = StreamingGrid(inner, pull_interval=0.0).send_and_receive(_train_messages(), timeout=10)
    assert inner.pulls == 0 and len(inner.outbox) == 3  # pushed at once, nothing pulled yet
    first = next(iter(replies))
    assert inner.pulls == 1 and first.content["c"]["n"] == 1
    rest = list(replies)
    assert [r.content["c"]["n"] for r in rest] == [2, 3] and inner.pulls == 3


def test_a_node_that_never_answers_ends_the_round_at_the_timeout(flower_task_identity):
    inner = TrickleGrid()
    replies = StreamingGrid(inner, pull_interval=0.01).send_and_receive(_train_messages(), timeout=0.2)
    inner.outbox.pop()  # node 3's message is lost
    assert len(list(replies)) == 2


def test_evaluation_rounds_go_through_the_wrapped_grid(flower_task_identity):
    class Collecting(TrickleGrid):
        def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
            return ["collected"]

    assert StreamingGrid(Collecting()).send_and_receive(_train_messages(MessageType.EVALUATE)) == ["collected"]


def test_replies_that_arrived_while_the_strategy_was_folding_are_pulled_after_the_deadline(flower_task_identity):
    """The deadline runs from the push; once it has passed, one last pull still collects what
    reached the grid while the strategy was busy with earlier replies (Flower's grids, which
    do nothing between pulls, would have collected them too)."""

    class AllAtOnce(TrickleGrid):
        def pull_messages(self, message_ids):
            self.pulls += 1
            ready = [m for m in self.outbox if m.metadata.message_id in set(message_ids)]
            ready = ready[:1] if self.pulls == 1 else ready  # the first pull finds one reply, later ones the rest
            for msg in ready:
                self.outbox.remove(msg)
            return [Message(RecordDict({"c": ConfigRecord({"n": m.metadata.dst_node_id})}), reply_to=m) for m in ready]

    import time

    inner = AllAtOnce()
    replies = iter(StreamingGrid(inner, pull_interval=0.01).send_and_receive(_train_messages(), timeout=0.2))
    next(replies)
    time.sleep(0.3)  # folding the first reply outlasts the round's timeout
    assert len(list(replies)) == 2
