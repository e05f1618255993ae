"""Delta codecs: exact where lossless, bounded where lossy, error feedback keeps every update,
and every malformed payload is refused with its reason."""

from __future__ import annotations

import math
import re
import struct
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.common.codecs import Codec, CodecError, decode, encode, payload_nbytes
from fedpeft.common.codecs.feedback import RESIDUAL_KEY, STATE_DIR_KEY
from fedpeft.common.codecs.mod import (
    codec_config,
    codec_mod,
    encoded_record,
    payload_of,
    plain_arrays,
    plain_record,
)
from fedpeft.common.codecs.quantizers import FOUR_BIT_BLOCK, INT8_BLOCK, QUANTIZERS
from fedpeft.common.codecs.wire import PREFIX


@pytest.fixture(autouse=True)
def _flower_messages(flower_task_identity):
    """Flower Messages need a task identity (conftest)."""


LAYOUT = OrderedDict([("q", (96, 8)), ("k", (8, 96)), ("layers.10.v", (5,)), ("layers.2.v", (3,))])
"""Not in alphabetical order, as PEFT's tensors are not (safetensors files sort their keys)."""


def _values(seed: int = 0, scale: float = 1.0) -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return OrderedDict((n, (rng.standard_normal(s) * scale).astype(np.float32)) for n, s in LAYOUT.items())


# ---- round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fp32", "topk:1", "topk:1+fp32"])
def test_lossless_codecs_round_trip_exactly(name):
    values = _values()
    payload, sent = encode(Codec.parse(name), values)
    out = decode(payload, Codec.parse(name), LAYOUT)
    assert all(np.array_equal(out[n], values[n]) and np.array_equal(sent[n], values[n]) for n in LAYOUT)


@pytest.mark.parametrize("name", ["fp16", "bf16", "int8", "nf4", "fp4", "topk:0.1", "topk:0.05+int8", "topk:0.3+nf4"])
def test_what_the_encoder_says_was_sent_is_what_the_decoder_reads(name):
    codec = Codec.parse(name)
    payload, sent = encode(codec, _values(), np.random.default_rng(1))
    assert len(payload) == payload_nbytes(codec, LAYOUT)
    out = decode(payload, codec, LAYOUT)
    assert all(np.array_equal(out[n], sent[n]) for n in LAYOUT)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 700), st.floats(1e-6, 1e3), st.integers(0, 2**31))
def test_dense_codecs_stay_within_their_error_bounds(n, scale, seed):
    x = (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)
    for name, tolerance, floor in (("fp16", 2**-11, 2**-25), ("bf16", 2**-8, 0.0)):  # fp16 subnormals: 2^-24 apart
        _, out = QUANTIZERS[name].encode(x)
        assert np.all(np.abs(out - x) <= tolerance * np.abs(x) + floor + 1e-30), name
    for name, block, step in (("int8", INT8_BLOCK, 1 / 127), ("nf4", FOUR_BIT_BLOCK, 0.33), ("fp4", FOUR_BIT_BLOCK, 0.34)):
        absmax = np.repeat(np.abs(np.pad(x, (0, -n % block))).reshape(-1, block).max(axis=1), block)[:n]
        for rng in (None, np.random.default_rng(seed)):
            _, out = QUANTIZERS[name].encode(x, rng)
            # nearest rounding: half a step; stochastic: under one step (NF4's widest gap is 0.30 of absmax)
            assert np.all(np.abs(out - x) <= step * absmax * (0.5 if rng is None and name == "int8" else 1.0) + 1e-6 * absmax)


@pytest.mark.parametrize("name, value", [("int8", 10.4 / 127), ("nf4", 0.3)])
def test_stochastic_rounding_is_unbiased_where_nearest_rounding_is_not(name, value):
    x = np.full(INT8_BLOCK * 2, value, dtype=np.float32)
    x[::FOUR_BIT_BLOCK] = 1.0  # each block's absmax: the value sits between two levels
    nearest = QUANTIZERS[name].encode(x)[1]
    draws = np.mean([QUANTIZERS[name].encode(x, np.random.default_rng(s))[1] for s in range(400)], axis=0)
    mask = x == np.float32(value)
    step = 1 / 127 if name == "int8" else 0.05
    assert abs(float(nearest[mask].mean()) - value) > 0.3 * step  # nearest rounding: always the same way
    assert abs(float(draws[mask].mean()) - value) < 0.05 * step


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_four_bit_codes_are_byte_for_byte_bitsandbytes(quant_type):
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("bitsandbytes.functional")
    x = torch.randn(1000)
    try:
        codes, state = functional.quantize_4bit(x, blocksize=FOUR_BIT_BLOCK, quant_type=quant_type)
    except (RuntimeError, NotImplementedError) as exc:  # a bitsandbytes build without CPU 4-bit
        pytest.skip(f"bitsandbytes cannot quantize on this CPU: {exc}")
    data, decoded = QUANTIZERS[quant_type].encode(x.numpy())
    blocks = math.ceil(1000 / FOUR_BIT_BLOCK)
    assert np.array_equal(np.frombuffer(data, np.float32, count=blocks), state.absmax.numpy())
    assert np.array_equal(np.frombuffer(data, np.uint8, offset=4 * blocks), codes.numpy().reshape(-1))
    assert np.array_equal(decoded, functional.dequantize_4bit(codes, state).numpy().reshape(-1))


def test_topk_keeps_the_largest_magnitudes_and_picks_the_smaller_index_form():
    x = np.zeros(1000, dtype=np.float32)
    x[[3, 500, 999]] = [5.0, -7.0, 6.0]
    x[10:20] = 0.1
    for fraction, bitmap in ((0.003, False), (0.05, True)):
        codec = Codec.parse(f"topk:{fraction}")
        payload, sent = encode(codec, {"x": x})
        kept = np.flatnonzero(sent["x"])
        assert {3, 500, 999} <= set(kept.tolist()) and kept.size <= codec.kept(1000)
        index_bytes = math.ceil(1000 / 8) if bitmap else 4 * codec.kept(1000)
        assert codec.tensor_nbytes(1000) == index_bytes + 4 * codec.kept(1000)


def test_compression_ratios_of_a_lora_sized_delta():
    layout = {"a": (8, 576), "b": (576, 8)}
    raw = sum(4 * math.prod(s) for s in layout.values())
    ratios = {name: raw / payload_nbytes(Codec.parse(name), layout)
              for name in ("fp16", "int8", "nf4", "topk:0.1+int8", "topk:0.05+nf4")}
    assert 1.99 < ratios["fp16"] <= 2 and 3.9 < ratios["int8"] < 4 and 7 < ratios["nf4"] < 7.2
    assert ratios["topk:0.1+int8"] > 16 and ratios["topk:0.05+nf4"] > 24


# ---- refusals ----------------------------------------------------------------------------------
def _payload(name="topk:0.01+int8", values=None) -> bytes:
    return encode(Codec.parse(name), values or _values())[0]


def _header_end(payload: bytes) -> int:
    _, _, size = PREFIX.unpack_from(payload)
    return -(-(PREFIX.size + size) // 8) * 8


def _corrupt(payload: bytes, offset: int, data: bytes) -> bytes:
    return payload[:offset] + data + payload[offset + len(data):]


CORRUPTIONS = {
    "another codec": (lambda p: p, "topk:0.01+nf4", "encoded with codec 'topk:0.01+int8', but this run uses 'topk:0.01+nf4'"),
    "truncated": (lambda p: p[:-3], None, "needs exactly"),
    "padded": (lambda p: p + b"\0" * 8, None, "needs exactly"),
    "not a payload": (lambda p: b"PK\x03\x04" + p[4:], None, "not a fedpeft encoded delta"),
    "header overflows": (lambda p: _corrupt(p, 8, struct.pack("<I", len(p))), None, "does not fit"),
    "header not JSON": (lambda p: _corrupt(p, PREFIX.size, b"\xff"), None, "not valid JSON"),
    # a (96, 8) tensor with 1% kept: k = 8 indices (a list: 4 x 8 bytes < 96 bitmap bytes) then int8 scales
    "index out of range": (lambda p: _corrupt(p, _header_end(p), struct.pack("<I", 768)), None, "out of range for 768"),
    "duplicate index": (lambda p: _corrupt(p, _header_end(p) + 4, p[_header_end(p):_header_end(p) + 4]), None,
                        "repeated or not ascending"),
    "NaN scale": (lambda p: _corrupt(p, _header_end(p) + 32, struct.pack("<f", float("nan"))), None, "bad scale nan"),
    "negative scale": (lambda p: _corrupt(p, _header_end(p) + 32, struct.pack("<f", -1.0)), None, "bad scale -1.0"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_malformed_payload_is_refused_with_its_reason(case):
    corrupt, codec, reason = CORRUPTIONS[case]
    with pytest.raises(CodecError, match=re.escape(reason)):
        decode(corrupt(_payload()), Codec.parse(codec or "topk:0.01+int8"), LAYOUT)


def test_a_header_that_is_not_in_canonical_form_is_refused_not_misread():
    payload = _payload("int8")
    _, version, size = PREFIX.unpack_from(payload)
    start = PREFIX.size
    spaced = payload[start:start + size].replace(b",", b", ", 8)  # valid JSON, 8 bytes longer
    padded = payload[:4] + bytes([version, 0, 0, 0]) + struct.pack("<I", len(spaced)) + spaced
    body = payload[_header_end(payload):]
    forged = padded + bytes(-len(padded) % 8) + body
    forged = forged[:len(payload)]  # the exact size the canonical layout needs
    with pytest.raises(CodecError, match="canonical form"):
        decode(forged, Codec.parse("int8"), LAYOUT)


def test_a_long_topk_fraction_survives_the_trip_through_the_config():
    codec = Codec.parse("topk:0.1234567891+int8")
    assert Codec.parse(codec.name) == codec and codec.kept(81) == Codec.parse(codec.name).kept(81)


def test_non_finite_values_after_decoding_are_refused():
    payload = bytearray(_payload("fp16"))
    start = _header_end(bytes(payload))
    payload[start:start + 2] = np.array([np.inf], np.float16).tobytes()
    with pytest.raises(CodecError, match=r"q: 0 NaN and 1 Inf values after decoding"):
        decode(bytes(payload), Codec.parse("fp16"), LAYOUT)


def test_a_bitmap_must_mark_exactly_k_positions_within_the_tensor():
    codec = Codec.parse("topk:0.5")
    payload = bytearray(encode(codec, {"x": np.arange(1, 11, dtype=np.float32)})[0])
    start = _header_end(bytes(payload))
    for bitmap, reason in ((b"\xff\x00", "marks 8 positions, the codec sends exactly 5"),
                           (b"\x1f\x80", "beyond the tensor's 10 values")):
        payload[start:start + 2] = bitmap
        with pytest.raises(CodecError, match=reason):
            decode(bytes(payload), codec, {"x": (10,)})


def test_another_layout_is_refused_naming_the_difference():
    payload = _payload("int8")
    with pytest.raises(CodecError, match=r"missing \['d'\]"):
        decode(payload, Codec.parse("int8"), {**LAYOUT, "d": (2,)})
    with pytest.raises(CodecError, match=r"q \(96, 8\) != \(8, 96\)"):
        decode(payload, Codec.parse("int8"), {**LAYOUT, "q": (8, 96)})
    with pytest.raises(CodecError, match="exceeds the limit"):
        decode(payload, Codec.parse("int8"), LAYOUT, max_bytes=100)


@pytest.mark.parametrize("text, reason", [("int7", "unknown codec"), ("topk:0", r"in \(0, 1\]"),
                                          ("topk:x", "must be a number"), ("topk:0.1+zip", "unknown value codec"),
                                          ("fp16+int8", "unknown codec"), ("topk:nan", r"in \(0, 1\]")])
def test_a_bad_codec_name_is_refused(text, reason):
    with pytest.raises(CodecError, match=reason):
        Codec.parse(text)


def test_fp16_refuses_values_it_would_turn_into_infinity():
    with pytest.raises(CodecError, match="overflows fp16"):
        encode(Codec.parse("fp16"), {"x": np.array([1e6], np.float32)})


def test_a_record_that_is_not_one_payload_array_is_refused():
    with pytest.raises(CodecError, match="expected a compressed delta"):
        payload_of(plain_record(_values()))


# ---- the client mod: update encoding and error feedback ---------------------------------------------
def _train_message(global_values, upload="topk:0.05+int8", download=None, server_round=1, feedback=True):
    from fedpeft.common.codecs.wire import Codec as C

    config = {"server-round": server_round, **codec_config(C.parse(upload), C.parse(download) if download else None,
                                                             feedback, True, seed=3)}
    arrays = (encoded_record(encode(C.parse(download), global_values)[0]) if download else plain_record(global_values))
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), dst_node_id=7, message_type="train")


def _context(state_dir=None, node_id=7) -> Context:
    node_config = {"partition-id": 2, **({STATE_DIR_KEY: str(state_dir)} if state_dir else {})}
    return Context(run_id=11, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={})


def _trainer(updates):
    """A handler that 'trains' by adding this round's update to the global delta it received."""
    def handle(msg: Message, context: Context) -> Message:
        received = plain_arrays(msg.content.array_records["arrays"])
        update = updates[int(msg.content.config_records["config"]["server-round"])]
        return Message(RecordDict({"arrays": plain_record({n: received[n] + update[n] for n in received})}),
                       reply_to=msg)
    return handle


def test_error_feedback_keeps_every_update_sent_plus_residual_is_the_sum_of_updates():
    rounds = 6
    updates = {r: _values(seed=r, scale=0.01) for r in range(1, rounds + 1)}
    context, codec = _context(), Codec.parse("topk:0.05+int8")
    sent_total = OrderedDict((n, np.zeros(s, np.float64)) for n, s in LAYOUT.items())
    for r in range(1, rounds + 1):
        reply = codec_mod(_train_message(_values(seed=100 + r), server_round=r), context, _trainer(updates))
        for n, v in decode(payload_of(reply.content.array_records["arrays"]), codec, LAYOUT).items():
            sent_total[n] += v
    residual = plain_arrays(context.state.array_records[RESIDUAL_KEY])
    for n in LAYOUT:
        truth = sum(updates[r][n].astype(np.float64) for r in updates)
        np.testing.assert_allclose(sent_total[n] + residual[n], truth, atol=1e-6)
        assert np.abs(residual[n]).max() > 0  # something was held back


def test_without_error_feedback_nothing_is_kept():
    context = _context()
    codec_mod(_train_message(_values(), feedback=False), context, _trainer({1: _values(seed=1, scale=0.01)}))
    assert RESIDUAL_KEY not in context.state.array_records


def test_a_restarted_client_reads_its_residual_back_from_its_state_dir(tmp_path):
    updates = {1: _values(seed=1, scale=0.01), 2: _values(seed=2, scale=0.01)}
    first = _context(tmp_path)
    codec_mod(_train_message(_values(), server_round=1), first, _trainer(updates))
    kept = plain_arrays(first.state.array_records[RESIDUAL_KEY])
    assert list(tmp_path.glob("error-feedback-*.safetensors"))
    restarted, fresh = _context(tmp_path, node_id=8), _context()  # a SuperNode without keys gets a new node id
    a = codec_mod(_train_message(_values(), server_round=2), restarted, _trainer(updates))
    b = codec_mod(_train_message(_values(), server_round=2), fresh, _trainer(updates))
    assert payload_of(a.content.array_records["arrays"]).tobytes() != payload_of(b.content.array_records["arrays"]).tobytes()
    first_round = codec_mod(_train_message(_values(), server_round=2), first, _trainer(updates))
    assert payload_of(a.content.array_records["arrays"]).tobytes() == \
        payload_of(first_round.content.array_records["arrays"]).tobytes()
    assert kept  # the residual the restart read


def test_the_mod_decodes_a_compressed_broadcast_for_the_handler_and_is_reproducible():
    global_values, seen = _values(seed=5), {}

    def handler(msg, context):
        seen["arrays"] = plain_arrays(msg.content.array_records["arrays"])
        return Message(RecordDict({"arrays": msg.content.array_records["arrays"]}), reply_to=msg)

    replies = [codec_mod(_train_message(global_values, download="bf16"), _context(), handler) for _ in range(2)]
    expected = decode(encode(Codec.parse("bf16"), global_values)[0], Codec.parse("bf16"))
    assert all(np.array_equal(seen["arrays"][n], expected[n]) for n in LAYOUT)
    payloads = [payload_of(r.content.array_records["arrays"]).tobytes() for r in replies]
    assert payloads[0] == payloads[1]  # stochastic rounding seeded by (run seed, partition, round)
    zero = decode(payloads[0], Codec.parse("topk:0.05+int8"), LAYOUT)
    assert all(not v.any() for v in zero.values())  # no training, no update


def test_the_mod_passes_messages_without_codecs_through_untouched():
    msg = Message(RecordDict({"arrays": plain_record(_values()), "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=7, message_type="train")
    reply = codec_mod(msg, _context(), lambda m, c: Message(RecordDict({"arrays": m.content.array_records["arrays"]}),
                                                             reply_to=m))
    assert list(reply.content.array_records["arrays"].keys()) == list(LAYOUT)


def test_plain_records_round_trip():
    record = plain_record(_values())
    assert isinstance(record, ArrayRecord)
    assert all(np.array_equal(plain_arrays(record)[n], _values()[n]) for n in LAYOUT)
