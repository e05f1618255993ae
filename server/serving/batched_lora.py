"""LoRA layers that apply a different adapter to each row of one batch (S-LoRA/Punica style).

Written by hand because no library does this well on CPU: peft's `adapter_names=`
mixed batches loop over the adapters present at every LoRA layer (one pair of small
matmuls per adapter per layer per step), and Punica's/S-LoRA's gathered kernels are
CUDA-only. Here every wrapped linear layer keeps the LoRA factors of each loaded
adapter ("slot") and, for a batch whose rows use slots s_1..s_n, computes

    y = base(x) + ((x @ A_cat^T) * M) @ B_cat^T

with A_cat / B_cat the factors of the distinct slots in the batch concatenated along
the rank axis (B scaled by each adapter's alpha/r) and M a per-row 0/1 mask that keeps
only the row's own slot's rank block (no mask when all rows share one adapter). That is two dense matmuls per layer whatever the
number of adapters, and the concatenation is rebuilt only when the batch's set of rows
changes (requests joining or finishing), not every decode step. Adapters stay
separate from the frozen base (nothing is merged), so loading, replacing and evicting
one never touches the others.

Adapters come from stock PEFT LoRA dirs (keys `base_model.model.<module>.lora_A.weight`);
`check_lora_config` refuses variants this path does not compute (DoRA, biases,
fan_in_fan_out, alpha patterns, modules_to_save) with a clear reason.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedpeft.server.serving.errors import AdapterIncompatibleError

_PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
BASE_SLOT = -1
"""Row marker for requests served by the base model alone."""


class BatchContext:
    """Which slot each row of the next forward uses; shared by all wrapped layers."""

    def __init__(self) -> None:
        self.rows: tuple[int, ...] = ()
        self.generation = 0
        """Bumped whenever a slot changes, so cached concatenations are rebuilt."""


@dataclass(frozen=True)
class LoraFactors:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float


def check_lora_config(config: Mapping[str, Any]) -> None:
    """Raise AdapterIncompatibleError unless `config` is a plain (rs)LoRA adapter config."""
    found = []
    if str(config.get("peft_type", "")).upper() != "LORA":
        found.append(f"peft_type is {config.get('peft_type')!r}; only LORA adapters are served in mixed batches")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True), ("lora_bias", True)):
        if config.get(key) is bad:
            found.append(f"{key}=true is not supported by the batched LoRA path")
    if config.get("bias", "none") != "none":
        found.append(f"bias={config.get('bias')!r} (only 'none')")
    for key in ("alpha_pattern", "modules_to_save", "target_parameters"):
        if config.get(key):
            found.append(f"{key} is set ({config.get(key)!r}); not supported by the batched LoRA path")
    if found:
        raise AdapterIncompatibleError("adapter cannot be served: " + "; ".join(found))


def lora_factors(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, LoraFactors]:
    """{module path in the base model: factors} from a PEFT LoRA state dict."""
    check_lora_config(config)
    try:
        alpha = float(config.get("lora_alpha", 8))
    except (TypeError, ValueError):
        raise AdapterIncompatibleError(f"lora_alpha {config.get('lora_alpha')!r} is not a number") from None
    if not math.isfinite(alpha):
        raise AdapterIncompatibleError(f"lora_alpha {alpha} is not finite")
    rslora = config.get("use_rslora", False) is True
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for suffix, which in _SUFFIXES.items():
            if key.startswith(_PREFIX) and key.endswith(suffix):
                parts.setdefault(key[len(_PREFIX):-len(suffix)], {})[which] = tensor
                break
        else:
            raise AdapterIncompatibleError(f"adapter tensor {key!r} is not a LoRA A/B weight of a linear layer")
    factors = {}
    for module, pair in parts.items():
        if set(pair) != {"A", "B"}:
            raise AdapterIncompatibleError(f"adapter has {sorted(pair)} but not both lora_A and lora_B for {module}")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterIncompatibleError(f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit")
        r = a.shape[0]
        factors[module] = LoraFactors(a, b, alpha / (math.sqrt(r) if rslora else r))
    if not factors:
        raise AdapterIncompatibleError("adapter holds no LoRA weights")
    return factors


class BatchedLoraLinear(nn.Module):
    """A frozen linear layer (plain or 4-bit) plus per-slot LoRA factors, applied per row."""

    def __init__(self, base: nn.Module, context: BatchContext) -> None:
        super().__init__()
        self.base = base
        self.context = context
        self.slots: dict[int, LoraFactors] = {}
        self._cached: tuple[tuple[int, tuple[int, ...]], Any] | None = None

    @property
    def in_features(self) -> int:
        return int(self.base.in_features)

    @property
    def out_features(self) -> int:
        return int(self.base.out_features)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        rows = self.context.rows
        if not rows or not self.slots:
            return y
        plan = self._plan(rows)
        if plan is None:
            return y
        a_cat, b_cat, mask = plan
        h = F.linear(x.to(a_cat.dtype), a_cat)
        if mask is not None:  # rows use different adapters: keep each row's own rank block
            h = h * (mask if h.ndim == 3 else mask[:, 0])
        return y.add_(F.linear(h, b_cat).to(y.dtype))

    def _plan(self, rows: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """A_cat, scale-folded B_cat and the 0/1 row mask (None when every row uses the same adapter)."""
        key = (self.context.generation, rows)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        present = sorted({s for s in rows if s in self.slots})
        plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        if present:
            offsets, total = {}, 0
            for s in present:
                offsets[s] = (total, total + self.slots[s].a.shape[0])
                total = offsets[s][1]
            a_cat = torch.cat([self.slots[s].a for s in present], dim=0)
            b_cat = torch.cat([self.slots[s].b * self.slots[s].scale for s in present], dim=1)
            mask = None
            if len(present) > 1 or len(set(rows)) > 1:
                mask = torch.zeros(len(rows), 1, total, dtype=a_cat.dtype, device=a_cat.device)
                for i, s in enumerate(rows):
                    if s in offsets:
                        lo, hi = offsets[s]
                        mask[i, 0, lo:hi] = 1.0
            plan = (a_cat, b_cat, mask)
        self._cached = (key, plan)
        return plan


class BatchedLoraModel:
    """Wraps a frozen base model's linear layers on demand and manages LoRA slots."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.context = BatchContext()
        self.layers: dict[str, BatchedLoraLinear] = {}
        self._dtype = next(model.parameters()).dtype
        if self._dtype not in (torch.float32, torch.float16, torch.bfloat16):
            self._dtype = torch.float32  # 4-bit bases store uint8; LoRA factors stay in float
        self._device = next(model.parameters()).device

    def add(self, slot: int, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> int:
        """Load an adapter into `slot` (all-or-nothing); returns the bytes it holds."""
        factors = lora_factors(config, tensors)
        problems = []
        for module, f in factors.items():
            target = self._linear(module)
            if target is None:
                problems.append(f"{module}: no such linear layer in the served base model")
            elif tuple(f.a.shape[1:]) != (target.in_features,) or f.b.shape[0] != target.out_features:
                problems.append(f"{module}: adapter maps {f.a.shape[1]}->{f.b.shape[0]}, "
                                f"the base layer {target.in_features}->{target.out_features}")
        if problems:
            shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
            raise AdapterIncompatibleError(f"adapter does not fit the served base model: {shown}")
        size = 0
        try:
            for module, f in factors.items():
                layer = self._wrap(module)
                a = f.a.to(self._device, self._dtype).contiguous()
                b = f.b.to(self._device, self._dtype).contiguous()
                layer.slots[slot] = LoraFactors(a, b, f.scale)
                size += a.numel() * a.element_size() + b.numel() * b.element_size()
        except BaseException:
            self.remove(slot)  # all or nothing: no half-loaded adapter stays behind
            raise
        self.context.generation += 1
        return size

    def bytes_needed(self, tensors: Mapping[str, torch.Tensor]) -> int:
        """What `add` will hold for these tensors (in the served dtype)."""
        return sum(t.numel() for t in tensors.values()) * torch.empty((), dtype=self._dtype).element_size()

    def remove(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.slots.pop(slot, None)
        self.context.generation += 1

    @contextmanager
    def rows(self, rows: tuple[int, ...]) -> Iterator[None]:
        """Run the enclosed forward with row i using slot rows[i] (BASE_SLOT: no adapter)."""
        previous = self.context.rows
        self.context.rows = tuple(rows)
        try:
            yield
        finally:
            self.context.rows = previous

    def _linear(self, path: str) -> nn.Module | None:
        if path in self.layers:
            return self.layers[path]
        try:
            module = self.model.get_submodule(path)
        except AttributeError:
            return None
        return module if hasattr(module, "in_features") and hasattr(module, "out_features") else None

    def _wrap(self, path: str) -> BatchedLoraLinear:
        if path not in self.layers:
            parent_path, _, name = path.rpartition(".")
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            wrapped = BatchedLoraLinear(getattr(parent, name), self.context)
            setattr(parent, name, wrapped)
            self.layers[path] = wrapped
        return self.layers[path]


def merge_lora_into(model: nn.Module, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """W += scale·B·A for every LoRA module (a merged single-task model: the benchmark's upper bound)."""
    for module, f in lora_factors(config, tensors).items():
        linear = model.get_submodule(module)
        if not isinstance(linear, nn.Linear):
            raise AdapterIncompatibleError(f"{module}: only plain (unquantized) linear layers can be merged")
        with torch.no_grad():
            w = linear.weight
            w += f.scale * (f.b.to(w.device, w.dtype) @ f.a.to(w.device, w.dtype))
