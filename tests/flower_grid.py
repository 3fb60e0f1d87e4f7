"""Flower's Grid contract in one process, for tests: each SuperNode's ClientApp runs on the caller's thread.

Messages and replies are Flower's own objects; a node can be made to fail (an error reply, as Flower
returns when a ClientApp raises) or to stay silent (no reply, as after a timeout) for chosen messages.
"""
from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE = 1


class LocalGrid:
    def __init__(self, app, node_configs: list[dict], fault: Callable[[Message, int], str | None] = lambda m, i: None):
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SERVER_NODE
        self.app, self.fault = app, fault
        self.contexts = {100 + k: Context(run_id=1, node_id=100 + k, node_config=dict(c), state=RecordDict(),
                                          run_config={}) for k, c in enumerate(node_configs)}
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            self.sent.append(m)
            node = m.metadata.dst_node_id
            what = self.fault(m, node - 100)
            if what == "silent":
                continue
            if what == "error":
                reply = Message(Error(code=0, reason="RuntimeError: injected failure"), reply_to=m)
            else:
                try:
                    reply = self.app(m, self.contexts[node])
                except Exception as e:  # what Flower's runtime does with a ClientApp that raises
                    reply = Message(Error(code=2, reason=f"{type(e).__name__}: {e}"), reply_to=m)
            self.replies.append(reply)
            out.append(reply)
        return out
