"""fedsrd's ClientApp, made hostile by the node config (tests only).

``hostile="a b c"``: in round r the SuperNode trains honestly, then sends its train reply mangled by attack
``[a, b, c][(r - 1) % 3]`` (`TRAIN_ATTACKS`); its final-sync reply is mangled as well (``round`` NaN).
``hostile-hello="x"``: the SuperNode answers every hello with the forged reply `HELLO_ATTACKS[x]` and never trains.
Nodes without these keys run fedsrd's ClientApp unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedsrd import wire
from fedsrd.integrations import flower as fl

HONEST = fl.make_client_app()
FORGED_ADAPTER_CONFIG = json.dumps(
    {"base_model_name_or_path": "evil/forged-base", "r": 999, "lora_alpha": 1, "target_modules": ["q_proj"],
     "peft_type": "LORA", "task_type": "CAUSAL_LM"}
)


def _with_config(content: RecordDict, **changes) -> RecordDict:
    config = dict(content[fl.CONFIG])
    for key, value in changes.items():
        if value is _DROP:
            config.pop(key, None)
        else:
            config[key] = value
    out = RecordDict({fl.CONFIG: ConfigRecord(config)})
    for key in content:
        if key != fl.CONFIG:
            out[key] = content[key]
    return out


_DROP = object()


def _with_update_meta(content: RecordDict, **meta) -> RecordDict:
    """The reply with its encoded update's metadata changed (a well-formed message with a lying header)."""
    update = fl.record_bytes(content)["update"]
    msg = wire.decode(update)
    msg.meta.update(meta)
    out = RecordDict({k: content[k] for k in content if k != fl.PAYLOAD})
    out[fl.PAYLOAD] = fl.bytes_record({"update": wire.encode(msg)})
    return out


def _payload_as(record) -> Callable[[RecordDict], RecordDict]:
    def mangle(content: RecordDict) -> RecordDict:
        out = RecordDict({k: content[k] for k in content if k != fl.PAYLOAD})
        out[fl.PAYLOAD] = record
        return out

    return mangle


TRAIN_ATTACKS: dict[str, Callable[[RecordDict], RecordDict]] = {
    "no-round": lambda c: _with_config(c, round=_DROP),
    "round-abc": lambda c: _with_config(c, round="abc"),
    "round-nan": lambda c: _with_config(c, round=float("nan")),
    "round-future": lambda c: _with_config(c, round=10**6),
    "status-odd": lambda c: _with_config(c, status=["ok"]),
    "no-config": lambda c: RecordDict({k: c[k] for k in c if k != fl.CONFIG}),
    "payload-config-record": _payload_as(ConfigRecord({"update": b"\x00" * 16})),
    "payload-float-array": _payload_as(ArrayRecord({"update": Array(np.zeros(4, dtype=np.float32))})),
    "steal-id": lambda c: _with_update_meta(c, client_id=0),
    "meta-id-string": lambda c: _with_update_meta(c, client_id="evil"),
    "meta-id-list": lambda c: _with_update_meta(c, client_id=[1]),
    "meta-overflow": lambda c: _with_update_meta(c, train_loss=10**400),
    "meta-samples": lambda c: _with_update_meta(c, num_samples=10**300),
}

HELLO_ATTACKS: dict[str, dict] = {
    # claims to be client 0 (already connected), with a forged PEFT config
    "claim-0": {"client-id": 0, "round": 0, "digest": "0" * 64, "status": "ok",
                "adapter-config": FORGED_ADAPTER_CONFIG},
    "round-abc": {"client-id": 0, "round": "abc", "digest": "0" * 64, "status": "ok"},
    "adapter-not-json": {"client-id": 1, "round": 0, "digest": "0" * 64, "status": "ok",
                         "adapter-config": "{not json"},
    "id-nan": {"client-id": float("nan"), "round": 0, "digest": "0" * 64},
}


def _attacks(context: Context) -> list[str]:
    return str(context.node_config.get("hostile", "")).split()


app = ClientApp()


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    forged = str(context.node_config.get("hostile-hello", ""))
    if forged:
        return Message(RecordDict({fl.CONFIG: ConfigRecord(HELLO_ATTACKS[forged])}), reply_to=msg)
    return HONEST(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = HONEST(msg, context)
    attacks = _attacks(context)
    if not attacks or reply.has_error():
        return reply
    round = int(msg.content[fl.CONFIG]["round"])
    attack = attacks[(round - 1) % len(attacks)]
    return Message(TRAIN_ATTACKS[attack](reply.content), reply_to=msg)


@app.query("sync")
def sync(msg: Message, context: Context) -> Message:
    reply = HONEST(msg, context)
    if not _attacks(context) or reply.has_error():
        return reply
    return Message(_with_config(reply.content, round=float("nan")), reply_to=msg)
