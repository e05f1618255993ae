"""Tiny random Llama/BERT models with a locally trained tokenizer: fast offline tests and
system-overhead benchmarks (deployment round time, bytes on the wire), never quality.

Layer output sizes are multiples of 32 (bitsandbytes 4-bit CPU kernels want that).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedpeft.common.data.builtin_task import generate_tickets


def build_tokenizer(out_dir: Path, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [r["text"] + " " + r["label"] for r in generate_tickets(400, seed=123)]
    corpus += ["Support ticket: Department: Text: Label: positive negative ### Instruction: ### Response:"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_llama(out_dir: Path, seed: int = 0, num_layers: int = 2) -> Path:
    """Write a random 2-layer Llama (hidden 64) + tokenizer to `out_dir`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    return out_dir


def build_tiny_bert(out_dir: Path, seed: int = 0) -> Path:
    """Write a random 2-layer BERT encoder (hidden 64) + the tiny tokenizer to `out_dir`."""
    from transformers import BertConfig, BertModel

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(out_dir)
    return out_dir
