"""Split fine-tuning: a causal LM cut after block `cut` into a client part and a server part.

- client part: token embeddings + blocks[:cut] (+ the final norm and LM head when
  U-shaped, so labels never leave the client). It is loaded with `num_hidden_layers=cut`,
  so the upper blocks are never read into the client's memory.
- server part: blocks[cut:] (+ final norm, LM head and loss when labels go to the server).
  Blocks below the cut are replaced by `_Dropped` before LoRA is applied.

Each part carries its own LoRA (HF peft on that part's modules). Both sides call the HF
model's own modules — embedding, rotary embedding, causal-mask builder, decoder layers,
norm, head and `loss_function` — found through `fedpeft.common.model.architectures`; the only
code written here is the loop over blocks, the same loop `LlamaModel.forward` runs.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedpeft.common.errors import ConfigError, SplitError
from fedpeft.common.methods import MethodConfig, get_method
from fedpeft.common.model.architectures import ARCHITECTURES, ArchitectureSpec, architecture_of, blocks_of
from fedpeft.common.model.base_model import load_base_model, model_kind
from fedpeft.common.model.quantization import Quantize
from fedpeft.common.protocol.deltas import DeltaAccess, DeltaSpec
from fedpeft.common.training.objectives import target_token_loss

MAX_ABS_ACTIVATION = 1e6
"""Default bound on any activation or gradient value a split client sends (`split.max_abs_activation`)."""

SPLIT_METHODS: tuple[str, ...] = ("lora",)
"""Methods a split part can carry: ones that only wrap linear layers (others insert modules
into the full forward pass, which neither part runs)."""


@dataclass(frozen=True)
class SplitConfig:
    """Where the model is cut, and whether the client also keeps the head (U-shaped)."""

    cut: int = 2
    """Blocks on the client (embeddings + blocks[:cut]); the server runs the rest."""
    u_shaped: bool = False
    """The client also holds the final norm + LM head and computes the loss: labels never leave it."""

    def __post_init__(self) -> None:
        if isinstance(self.cut, bool) or not isinstance(self.cut, int) or self.cut < 1:
            raise ConfigError(f"split cut must be an integer >= 1 (blocks on the client), got {self.cut!r}")


def check_split(model_dir: Path, split: SplitConfig, method: str = "lora") -> int:
    """Validate a cut against the checkpoint's config (no weights loaded); returns its block count."""
    if method not in SPLIT_METHODS:
        raise ConfigError(f"split fine-tuning supports methods {list(SPLIT_METHODS)}, not {method!r}")
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {Path(model_dir) / 'config.json'}: {exc}") from exc
    spec = ARCHITECTURES.get(config.get("model_type", ""))
    if spec is None or not spec.splittable or model_kind(Path(model_dir)) != "causal-lm":
        supported = sorted(k for k, v in ARCHITECTURES.items() if v.splittable)
        raise ConfigError(f"model type {config.get('model_type')!r} cannot be split; causal LMs of {supported} can")
    blocks = int(config.get("num_hidden_layers", 0))
    if not 1 <= split.cut < blocks:
        raise ConfigError(f"split cut {split.cut} must leave blocks on both sides: 1 <= cut < {blocks}")
    return blocks


class _Dropped(nn.Module):
    """Stands in for a block that lives on the other side of the cut (holds no weights)."""

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        raise SplitError("this block is held by the other side of the split")


def _spec(base: nn.Module) -> ArchitectureSpec:
    spec = architecture_of(base)
    if not spec.splittable:
        raise ConfigError(f"{type(base).__name__} has no split positions in fedpeft.common.model.architectures")
    return spec


def run_blocks(base: nn.Module, blocks: range, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Run `base`'s blocks `blocks` on `hidden` (B, S, H) with the padding mask (B, S).

    Positions, the causal mask and the rotary (cos, sin) are rebuilt on each side from
    the padding mask exactly as `LlamaModel.forward` builds them (no KV cache).
    """
    from transformers.masking_utils import create_causal_mask

    spec = _spec(base)
    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    causal_mask = create_causal_mask(config=base.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                     past_key_values=None, position_ids=position_ids)
    position_embeddings = base.get_submodule(spec.rotary)(hidden, position_ids=position_ids)
    layers = blocks_of(base)
    for index in blocks:
        hidden = layers[index](hidden, attention_mask=causal_mask, position_embeddings=position_embeddings,
                               position_ids=position_ids)
    return hidden


def head_logits(base: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm + LM head on the last block's output."""
    spec = _spec(base)
    return base.get_submodule(spec.lm_head)(base.get_submodule(spec.final_norm)(hidden))


def lm_loss(base: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The model's own causal-LM loss (shifted cross-entropy, -100 ignored)."""
    return base.loss_function(logits=logits, labels=labels, vocab_size=base.config.vocab_size)


def target_loss(base: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The same loss as `lm_loss(head_logits(hidden))`, with the head run only where a
    token has a target (`fedpeft.common.training.objectives.target_token_loss`)."""
    loss = target_token_loss(lambda h: head_logits(base, h), hidden, labels)
    if loss is None:
        raise SplitError("the batch has no target tokens (every label is -100)")
    return loss


@dataclass
class SplitPart(DeltaAccess):
    """One side of the cut: a peft-wrapped (partial) model, the blocks it runs, its delta."""

    model: nn.Module
    """The PeftModel around this side's (partial) base model."""
    blocks: range
    split: SplitConfig
    delta_names: list[str]
    spec: DeltaSpec

    @property
    def base(self) -> nn.Module:
        return self.model.get_base_model()

    @property
    def hidden_size(self) -> int:
        return int(self.base.config.hidden_size)


class ClientPart(SplitPart):
    """Embeddings + the first `cut` blocks (and, U-shaped, the norm, head and loss)."""

    def bottom(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The activations sent to the server: blocks[:cut] on the token embeddings."""
        embeds = self.base.get_submodule(_spec(self.base).embeddings)(input_ids)
        return run_blocks(self.base, self.blocks, embeds, attention_mask)

    def top_loss(self, server_output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """U-shaped: the loss on the server's last-block output, computed here."""
        if not self.split.u_shaped:
            raise SplitError("top_loss is only for U-shaped splits (the server computes the loss otherwise)")
        return target_loss(self.base, server_output, labels)


class ServerPart(SplitPart):
    """Blocks[cut:] (and, unless U-shaped, the norm, head and loss)."""

    def middle(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The server's blocks on the client's activations."""
        return run_blocks(self.base, self.blocks, hidden, attention_mask)

    def loss(self, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Labels-on-server: the loss of the client's activations through the rest of the model."""
        if self.split.u_shaped:
            raise SplitError("a U-shaped server never sees labels")
        return target_loss(self.base, self.middle(hidden, attention_mask), labels)


def _wrap(base: nn.Module, method_name: str, config: MethodConfig, seed: int) -> tuple[nn.Module, list[str]]:
    method = get_method(method_name)
    torch.manual_seed(seed)
    model = method.build(base, config)
    return model, method.delta_names(model)


def load_client_part(model_dir: Path, split: SplitConfig, config: MethodConfig, quantize: Quantize = "4bit",
                     seed: int = 0, method: str = "lora", device: torch.device | None = None) -> ClientPart:
    """The client's part, loaded with only its `cut` blocks (the rest never enters memory)."""
    check_split(model_dir, split, method)
    base = load_base_model(model_dir, quantize, device=device, num_hidden_layers=split.cut)
    model, names = _wrap(base, method, config, seed)
    return ClientPart(model=model, blocks=range(split.cut), split=split, delta_names=names,
                      spec=DeltaSpec.of_model(model, names))


def load_server_part(model_dir: Path, split: SplitConfig, config: MethodConfig, quantize: Quantize = "4bit",
                     seed: int = 0, method: str = "lora", device: torch.device | None = None) -> ServerPart:
    """The server's part: the full checkpoint with blocks[:cut] dropped before LoRA is applied."""
    num_blocks = check_split(model_dir, split, method)
    base = load_base_model(model_dir, quantize, device=device)
    layers = blocks_of(base)
    for index in range(split.cut):
        layers[index] = _Dropped()
    gc.collect()
    model, names = _wrap(base, method, config, seed + 1)  # a seed of its own: not the clients' initial A
    return ServerPart(model=model, blocks=range(split.cut, num_blocks), split=split, delta_names=names,
                      spec=DeltaSpec.of_model(model, names))


class JoinedSplitModel(nn.Module):
    """Both parts in one process, called like a causal LM (`.logits`, `.loss`): the
    server evaluates the global client part with its shared server part through it."""

    def __init__(self, client: ClientPart, server: ServerPart) -> None:
        super().__init__()
        if client.split != server.split:
            raise SplitError(f"client split {client.split} differs from the server's {server.split}")
        self.client, self.server = client, server
        self.client_model, self.server_model = client.model, server.model  # registered: .parameters(), .eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **_: object):
        from transformers.modeling_outputs import CausalLMOutput

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.server.middle(self.client.bottom(input_ids, attention_mask), attention_mask)
        top = self.client.base if self.client.split.u_shaped else self.server.base
        logits = head_logits(top, hidden)
        return CausalLMOutput(loss=lm_loss(top, logits, labels) if labels is not None else None, logits=logits)
