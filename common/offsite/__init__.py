"""Offsite-Tuning (Xiao et al. 2023): the model owner never ships the full model.

The owner splits a full model into an *adapter* (the bottom and top blocks, which
clients tune) and an *emulator* (the middle blocks, compressed by uniform layer drop and
optionally distilled). Clients federate on emulator + adapter as an ordinary model dir;
the owner plugs the aggregated adapter back into the full model.
"""

from fedpeft.common.offsite.emulator import build_emulator
from fedpeft.common.offsite.layer_map import LAYER_MAP_FILE, LayerMap, read_layer_map
from fedpeft.common.offsite.plugin import plug_in, rekey_adapter

__all__ = ["LAYER_MAP_FILE", "LayerMap", "build_emulator", "plug_in", "read_layer_map", "rekey_adapter"]
