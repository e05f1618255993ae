"""The client side of compressed deltas: a Flower mod around the ClientApp's train handler.

The server names the codecs in each train message's config (`codec_config`). On the
way in, `codec_mod` decodes a compressed global delta into the plain ArrayRecord the
handler (and Flower's `fixedclipping_mod` inside it, under DP) expects; on the way out it
replaces the reply's trained delta by its *update* (trained minus received, plus the
error-feedback residual, `fedpeft.common.codecs.feedback`), encoded as one buffer
(`fedpeft.common.codecs.wire`). The server adds the decoded update to the exact global
delta it sent, so a lossy broadcast never accumulates error on the server.

Without a codec, when the config asks for a flat upload (`FLAT_UPLOAD_KEY`), the reply's
trained delta leaves as one fp32 buffer in the same wire layout, its exact float32 bits
(`flat_upload_record`), which the server checks and reads in place; with neither, the mod
does nothing. One mod for the simulation's ClientApp and the deployment's torch-free
forwarder, so both compress identically. Stochastic
rounding draws from a generator seeded by (run seed, partition, round): reruns are identical.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedpeft.common.codecs.feedback import load_residual, save_residual
from fedpeft.common.codecs.quantizers import CodecError
from fedpeft.common.codecs.wire import Codec, decode, encode, encode_fp32
from fedpeft.common.protocol.npy import exact_npy

UPLOAD_CODEC_KEY = "fedpeft-upload-codec"
DOWNLOAD_CODEC_KEY = "fedpeft-download-codec"
ERROR_FEEDBACK_KEY = "fedpeft-error-feedback"
STOCHASTIC_KEY = "fedpeft-stochastic-rounding"
SEED_KEY = "fedpeft-codec-seed"
FLAT_UPLOAD_KEY = "fedpeft-flat-upload"
"""Set (True) by a server that wants an uncompressed reply as one fp32 buffer (`FP32`): the
trained delta itself, not its update, so the server receives exactly the client's bits."""
PARTITION_KEY = "partition-id"
ENCODED_ARRAY = "fedpeft-encoded"
"""The one Array of a compressed delta's ArrayRecord (uint8, the `wire` payload)."""
ARRAYS_KEY = "arrays"
MAX_DOWNLINK_BYTES = 512 * 1024 * 1024


def codec_config(upload: Codec | None, download: Codec | None, error_feedback: bool,
                 stochastic: bool, seed: int = 0) -> dict[str, str | bool | int]:
    """The train-config entries that tell clients how to decode and encode (empty: no codec)."""
    config: dict[str, str | bool | int] = {}
    if upload is not None:
        config.update({UPLOAD_CODEC_KEY: upload.name, ERROR_FEEDBACK_KEY: error_feedback, STOCHASTIC_KEY: stochastic,
                       SEED_KEY: seed})
    if download is not None:
        config[DOWNLOAD_CODEC_KEY] = download.name
    return config


def encoded_record(payload: bytes) -> ArrayRecord:
    """A compressed delta as the ArrayRecord that carries it (one uint8 array)."""
    return ArrayRecord(OrderedDict({ENCODED_ARRAY: Array(np.frombuffer(payload, dtype=np.uint8))}))


def flat_upload_record(values: Mapping[str, np.ndarray]) -> ArrayRecord:
    """A plain upload: float32 `values` (name -> array, in the method's order) as one fp32
    buffer with their exact bits, non-finite ones included (the server judges them)."""
    return encoded_record(encode_fp32(values))


def payload_of(record: ArrayRecord) -> memoryview:
    """The payload bytes of a compressed delta's ArrayRecord; anything else raises CodecError."""
    if list(record.keys()) != [ENCODED_ARRAY]:
        raise CodecError(f"expected a compressed delta (one array {ENCODED_ARRAY!r}), got arrays {list(record.keys())[:4]}")
    array = exact_npy(ENCODED_ARRAY, record[ENCODED_ARRAY])
    if array.dtype != np.uint8 or array.ndim != 1:
        raise CodecError(f"{ENCODED_ARRAY}: expected a 1-D uint8 array, got {array.dtype} {array.shape}")
    return memoryview(array)


def plain_arrays(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    """The float32 arrays of a plain delta record."""
    return OrderedDict((name, np.asarray(exact_npy(name, array), dtype=np.float32)) for name, array in record.items())


def exact_float32(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    """The arrays of a plain delta record, which must already be float32 (a flat upload
    carries the client's exact bits, never a cast of them)."""
    arrays = OrderedDict((name, exact_npy(name, array)) for name, array in record.items())
    wrong = [f"{n} ({a.dtype})" for n, a in arrays.items() if a.dtype != np.float32]
    if wrong:
        raise CodecError(f"a flat upload carries float32 tensors only, not {', '.join(wrong[:4])}")
    return arrays


def plain_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((n, Array(np.ascontiguousarray(a, dtype=np.float32))) for n, a in arrays.items()))


def _config_codec(config: ConfigRecord, key: str) -> Codec | None:
    value = config.get(key)
    return None if value is None else Codec.parse(str(value), f"message from server: {key}")


def _flag(config: ConfigRecord, key: str) -> bool:
    value = config.get(key, False)
    if not isinstance(value, bool):
        raise CodecError(f"message from server: {key} must be a boolean, got {value!r:.40}")
    return value


def _rounding_rng(config: ConfigRecord, context: Context) -> np.random.Generator:
    """Stochastic rounding's generator, seeded by (run seed, partition, round): the same draws
    for the same client and round in simulation and deployment, and after a restart."""
    parts = [config.get(SEED_KEY, 0), context.node_config.get(PARTITION_KEY, context.node_id), config.get("server-round", 0)]
    if not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in parts):
        raise CodecError(f"message from server: {SEED_KEY}, server-round and this node's {PARTITION_KEY} must be "
                         f"integers >= 0 (got {parts!r:.80})")
    return np.random.default_rng([*parts, 0xC0DEC])


def codec_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Decode the compressed global delta in, encode the reply's update out (see the module doc)."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    config = msg.content.config_records.get("config")
    upload = _config_codec(config, UPLOAD_CODEC_KEY) if config is not None else None
    download = _config_codec(config, DOWNLOAD_CODEC_KEY) if config is not None else None
    flat = _flag(config, FLAT_UPLOAD_KEY) if config is not None else False
    if upload is None and download is None and not flat:
        return call_next(msg, context)
    assert config is not None
    if flat and upload is not None:
        raise CodecError(f"message from server: {FLAT_UPLOAD_KEY} and {UPLOAD_CODEC_KEY} exclude each other")
    if download is not None and download.topk is not None:
        raise CodecError("message from server: a broadcast cannot be top-k sparsified")
    record = msg.content.array_records.get(ARRAYS_KEY)
    if record is None:
        raise CodecError("message from server carries no global delta")
    if download is not None:
        received = decode(payload_of(record), download, max_bytes=MAX_DOWNLINK_BYTES)
        msg.content = RecordDict({**dict(msg.content.items()), ARRAYS_KEY: plain_record(received)})
    elif upload is not None:
        received = plain_arrays(record)
    reply = call_next(msg, context)
    if reply.has_error() or (upload is None and not flat):
        return reply
    if upload is None:  # the trained delta as it is, in one buffer
        one_buffer = flat_upload_record(exact_float32(reply.content.array_records[ARRAYS_KEY]))
        reply.content = RecordDict({**dict(reply.content.items()), ARRAYS_KEY: one_buffer})
        return reply
    trained = plain_arrays(reply.content.array_records[ARRAYS_KEY])
    if list(trained) != list(received) or any(trained[n].shape != received[n].shape for n in received):
        raise CodecError("the trained delta's tensors differ from the global delta's; cannot encode its update")
    update = OrderedDict((n, trained[n] - received[n]) for n in received)
    feedback = _flag(config, ERROR_FEEDBACK_KEY) and not upload.lossless
    if feedback:
        residual = load_residual(context, OrderedDict((n, u.shape) for n, u in update.items()))
        update = OrderedDict((n, u + residual[n]) for n, u in update.items())
    rng = _rounding_rng(config, context) if _flag(config, STOCHASTIC_KEY) else None
    payload, sent = encode(upload, update, rng)
    if feedback:
        save_residual(context, OrderedDict((n, u - sent[n]) for n, u in update.items()))
    reply.content = RecordDict({**dict(reply.content.items()), ARRAYS_KEY: encoded_record(payload)})
    return reply
