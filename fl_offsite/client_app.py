"""Flower ClientApp: a data owner. Thin: the work is in ``fl_offsite.federation.client``."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from .federation import client, secagg
from .federation.protocol import BUNDLE_ACTION, HELLO_ACTION

app = ClientApp()


@app.query(HELLO_ACTION)
def hello(msg: Message, context: Context) -> Message:
    return client.hello(msg, context)


@app.query(BUNDLE_ACTION)
def receive_bundle(msg: Message, context: Context) -> Message:
    return client.receive_bundle(msg, context)


@app.train(mods=[secagg.client_mod])  # SecAgg+ rounds (secagg.enabled); others pass
def train(msg: Message, context: Context) -> Message:
    return client.train_adapter(msg, context)
