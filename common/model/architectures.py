"""Where things are inside each supported transformer family, keyed by `model_type`.

Methods that insert modules of their own (bottleneck, parallel and fusion adapters, UniPELT's gated
LoRA and prefix gates, the offsite emulator builder, split fine-tuning) look positions up here instead of
branching on model classes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from fedpeft.common.errors import ConfigError


@dataclass(frozen=True)
class ParallelSite:
    """Where a parallel adapter (He et al. 2022) reads the FFN sublayer's input and adds
    its output: `module` is called with that input as positional argument `input_arg`;
    `into_residual` adds the adapter output to that argument (for blocks whose module
    also does the residual add and norm, like BERT's `BertOutput`), otherwise to the
    module's output (a plain FFN like Llama's `mlp`)."""

    module: str
    input_arg: int = 0
    into_residual: bool = False


@dataclass(frozen=True)
class ArchitectureSpec:
    """Dotted paths relative to the model (blocks) and to one block (sublayers)."""

    blocks: str
    """The ModuleList of transformer blocks."""
    attention_output: str
    """The projection that ends the attention sublayer, before the residual add."""
    ffn_output: str
    """The projection that ends the feed-forward sublayer, before the residual add."""
    ffn_parallel: ParallelSite
    """Where a parallel FFN adapter attaches."""
    query_value: tuple[str, ...]
    """The attention's query and value projections (GPT-2: its fused query/key/value projection)."""
    backbone: str
    """The transformer body below any head: the module called with the 2-D padding `attention_mask`."""
    classifier: str = "score"
    """The sequence-classification head (trained with every method when present)."""
    num_layers_key: str = "num_hidden_layers"
    """The config attribute holding the number of blocks (rewritten when blocks are dropped)."""
    embeddings: str | None = None
    """Token embeddings (split fine-tuning: on the client). None: the family cannot be split."""
    final_norm: str | None = None
    """The norm after the last block, before the head (split: server, or client when U-shaped)."""
    rotary: str | None = None
    """The rotary position-embedding module whose (cos, sin) every block is called with."""
    lm_head: str | None = None
    """The language-model head (split: server, or client when U-shaped)."""
    attention_projections: tuple[str, ...] = ()
    """Every projection of the attention sublayer (query, key, value, output)."""

    @property
    def splittable(self) -> bool:
        """Whether split fine-tuning knows where this family's parts are."""
        return None not in (self.embeddings, self.final_norm, self.rotary, self.lm_head)


_LLAMA_LIKE = ArchitectureSpec(blocks="model.layers", attention_output="self_attn.o_proj", ffn_output="mlp.down_proj",
                             ffn_parallel=ParallelSite("mlp"), query_value=("self_attn.q_proj", "self_attn.v_proj"),
                             backbone="model", embeddings="model.embed_tokens", final_norm="model.norm",
                             rotary="model.rotary_emb", lm_head="lm_head",
                             attention_projections=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                    "self_attn.o_proj"))
_BERT_LIKE = ArchitectureSpec(blocks="bert.encoder.layer", attention_output="attention.output.dense",
                              ffn_output="output.dense",
                              ffn_parallel=ParallelSite("output", input_arg=1, into_residual=True),
                              query_value=("attention.self.query", "attention.self.value"), backbone="bert",
                              classifier="classifier",
                              attention_projections=("attention.self.query", "attention.self.key",
                                                     "attention.self.value", "attention.output.dense"))

# Phi-3 is Llama-shaped but fuses query, key and value into one projection.
_PHI3 = replace(_LLAMA_LIKE, query_value=("self_attn.qkv_proj",),
                attention_projections=("self_attn.qkv_proj", "self_attn.o_proj"))

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "phi3": _PHI3,
    "gpt2": ArchitectureSpec(blocks="transformer.h", attention_output="attn.c_proj", ffn_output="mlp.c_proj",
                             ffn_parallel=ParallelSite("mlp"), query_value=("attn.c_attn",), backbone="transformer",
                             num_layers_key="n_layer", attention_projections=("attn.c_attn", "attn.c_proj")),
    "bert": _BERT_LIKE,
}


def is_sequence_classifier(model: nn.Module) -> bool:
    """True for `AutoModelForSequenceClassification` models (a task head on top)."""
    return type(model).__name__.endswith("ForSequenceClassification")


def architecture_of(model: nn.Module) -> ArchitectureSpec:
    """The spec for `model.config.model_type`; unsupported types name the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        return ARCHITECTURES[model_type]  # type: ignore[index]
    except KeyError:
        raise ConfigError(f"model type {model_type!r} has no architecture entry; supported: {sorted(ARCHITECTURES)}") from None


def default_target_modules(model: nn.Module, attention: bool = False) -> tuple[str, ...]:
    """A peft method's default targets on `model`: its architecture's attention query and value
    projections (or, with `attention`, every attention projection); none for a model type
    without an architecture entry, where peft's own per-model-type defaults then apply."""
    try:
        spec = architecture_of(model)
    except ConfigError:
        return ()
    return spec.attention_projections if attention else spec.query_value


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of `model`, in order."""
    blocks = model.get_submodule(architecture_of(model).blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise ConfigError(f"{architecture_of(model).blocks} of {type(model).__name__} is not a ModuleList")
    return blocks
