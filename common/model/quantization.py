"""4-bit (QLoRA-style NF4) backbones through bitsandbytes, and the CPU repacking trap.

bitsandbytes 0.50.2 on CPUs with AVX512-BF16 repacks 4-bit weights into a different
layout on the first no-grad forward. After that, autograd no longer flows through the
frozen 4-bit layers (adapters below them get no gradient) and `state_dict()` returns
weights in the repacked layout. Turning `support_avx512bf16_for_cpu` off on every
`Linear4bit` keeps the standard kernel path; `disable_cpu_weight_repacking` does that
and is applied by `fedpeft.common.model.base_model.load_base_model` to every 4-bit model.
"""

from __future__ import annotations

import functools
import importlib.util
import platform
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from fedpeft.common.errors import ConfigError

Quantize = Literal["4bit", "none"]
QUANTIZE_CHOICES: tuple[str, ...] = ("4bit", "none")


@functools.cache
def bitsandbytes_available() -> bool:
    """Whether bitsandbytes can be imported (cached: the import is slow)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return False
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # a broken native library must not break CPU-only code paths
        return False
    return True


@functools.cache
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 instructions (AVX512-BF16 or AMX-BF16)."""
    if platform.system() != "Linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(device: torch.device) -> torch.dtype:
    """The matmul dtype for dequantized 4-bit weights on `device`."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def resolve_quantize(value: str) -> str:
    """`auto` means 4-bit wherever bitsandbytes imports, else full precision."""
    if value == "auto":
        return "4bit" if bitsandbytes_available() else "none"
    return value


def validate_quantize(value: str) -> Quantize:
    """Check a `--quantize` value, and that 4-bit is usable on this machine."""
    if value not in QUANTIZE_CHOICES:
        raise ConfigError(f"quantize={value!r} is not supported; choose one of {list(QUANTIZE_CHOICES)}")
    if value == "4bit" and not bitsandbytes_available():
        raise ConfigError("quantize='4bit' needs bitsandbytes, which cannot be imported here; use quantize='none'")
    return value  # type: ignore[return-value]


def four_bit_config(device: torch.device, skip_modules: list[str] | None = None):  # -> BitsAndBytesConfig
    """NF4 quantization config with the compute dtype that suits `device`.

    `skip_modules` stay in full precision. A new classification head must: it is
    trained, and 4-bit weights cannot be. (transformers finds an LM head to skip by
    itself, but not a `classifier` whose last parameter is a bias.)
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype(device),
        bnb_4bit_use_double_quant=False,
        llm_int8_skip_modules=skip_modules,
    )


def four_bit_layers(model: nn.Module) -> list[nn.Module]:
    """All bitsandbytes `Linear4bit` modules of `model` (empty without bitsandbytes)."""
    if not bitsandbytes_available():
        return []
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def disable_cpu_weight_repacking(model: nn.Module) -> int:
    """Keep bitsandbytes from repacking 4-bit weights on CPU; returns layers patched.

    See the module docstring for the failure this prevents. The attribute only exists
    in bitsandbytes releases that have the AVX512-BF16 path; setting it elsewhere is
    harmless.
    """
    layers = four_bit_layers(model)
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)
