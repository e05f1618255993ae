"""A deployment ClientApp that does everything inside Flower's per-message process.

Flower's SuperNode starts a fresh ClientApp process for every message, so this app
imports torch, loads the 4-bit base model and reads the data again for each one. It
exists to measure what `peft-client`'s long-lived trainer saves (`peft-bench-deploy
--modes plain-inprocess`); `peft-client` itself always uses `fedpeft.client.flower_app`.
Its node config (written by `peft-client start`) names the model, data and seed.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpeft.client.app import ClientSetup, handle_train
from fedpeft.client.flower_app import partition_query
from fedpeft.client.launcher import load_client_rows
from fedpeft.common.codecs.mod import codec_mod

app = ClientApp(mods=[codec_mod])  # compressed runs: the same mod as fedpeft.client.flower_app
app.query()(partition_query)


@app.train()
def train(msg: Message, context: Context) -> Message:
    node = context.node_config
    rows, _ = load_client_rows(str(node["data"]), int(node.get("data-seed", 0)))
    setup = ClientSetup(model_dir=str(node["model-dir"]), quantize=str(node["quantize"]), data=lambda _ctx: rows,
                        torch_threads=int(node.get("torch-threads", 1)))
    return handle_train(setup, msg, context)
