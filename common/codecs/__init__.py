"""Compressed PEFT deltas: codecs (`wire`, `quantizers`), error feedback (`feedback`) and the
client's Flower mod (`mod`). Torch-free: the deployment's ClientApp imports it."""

from fedpeft.common.codecs.quantizers import CodecError
from fedpeft.common.codecs.wire import Codec, decode, encode, payload_nbytes

__all__ = ["Codec", "CodecError", "decode", "encode", "payload_nbytes"]
