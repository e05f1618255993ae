"""AdapterFusion: stage-1 bottleneck adapters trained per task, then a fusion layer
trained over them with the adapters frozen bit-for-bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from method_helpers import logits, probe_batch, train_steps

from fedpeft.common.errors import ConfigError
from fedpeft.common.methods import get_method, make_config
from fedpeft.common.model.adapted import AdaptedModel
from fedpeft.common.model.base_model import load_base_model
from fedpeft.common.model.quantization import bitsandbytes_available

QUANT = ["none", pytest.param("4bit", marks=pytest.mark.skipif(not bitsandbytes_available(), reason="no bnb"))]


def _task_batch(vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(3, vocab, (4, 12), generator=torch.Generator().manual_seed(seed))
    return x, torch.ones_like(x)


@pytest.fixture(scope="module")
def stage_one(tiny_model_dir, tmp_path_factory):
    """Two pfeiffer adapters, each trained on its own tiny task and saved."""
    out = tmp_path_factory.mktemp("stage-one")
    dirs = []
    for task in (0, 1):
        adapted = AdaptedModel.load(tiny_model_dir, "none", "bottleneck",
                                    make_config("bottleneck", {"reduction_factor": "8"}), seed=task)
        x, mask = _task_batch(adapted.model.config.vocab_size, seed=10 + task)
        train_steps(adapted, x, mask, steps=5)
        adapted.save_adapter(out / f"task{task}")
        dirs.append(str(out / f"task{task}"))
    return dirs


def _loss(model, x, mask) -> float:
    with torch.no_grad():
        return float(model(input_ids=x, attention_mask=mask, labels=x).loss)


@pytest.mark.parametrize("quantize", QUANT)
def test_fusion_trains_only_the_fusion_and_keeps_the_adapters_bit_identical(tiny_model_dir, tmp_path, stage_one,
                                                                            quantize):
    from safetensors.torch import load_file

    config = make_config("adapter_fusion", {"adapter_dirs": ",".join(stage_one)})
    adapted = AdaptedModel.load(tiny_model_dir, quantize, "adapter_fusion", config, seed=0)
    assert adapted.delta_names and all(".fusion." in n for n in adapted.delta_names), adapted.delta_names
    params = dict(adapted.model.named_parameters())
    # the loaded adapters are exactly the stage-1 ones (adapter i of each block from file i)
    for task, adapter_dir in enumerate(stage_one):
        for name, saved in load_file(f"{adapter_dir}/adapter_model.safetensors").items():
            assert torch.equal(params[name.replace(".adapter.", f".adapters.{task}.")], saved), name
    frozen = {n: p.detach().clone() for n, p in params.items() if ".adapters." in n}
    x, mask = _task_batch(adapted.model.config.vocab_size, seed=20)
    adapted.model.eval()
    first = _loss(adapted.model, x, mask)
    train_steps(adapted, x, mask, steps=6)
    adapted.model.eval()
    assert _loss(adapted.model, x, mask) < first
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    # every peer loading the same dirs gets the same fingerprint of the frozen adapters
    other = AdaptedModel.load(tiny_model_dir, quantize, "adapter_fusion", config, seed=3)
    assert adapted.frozen_fingerprint() and other.frozen_fingerprint() == adapted.frozen_fingerprint()
    # delta round trip onto a fresh build, and save/load, reproduce the logits
    other.set_delta(adapted.get_delta())
    px, pmask = probe_batch(adapted.model.config.vocab_size)
    torch.testing.assert_close(logits(other.model, px, pmask), logits(adapted.model, px, pmask), rtol=0, atol=1e-5)
    adapted.save_adapter(tmp_path / "fusion")
    reloaded = get_method("adapter_fusion").load_adapter(load_base_model(tiny_model_dir, quantize), tmp_path / "fusion")
    torch.testing.assert_close(logits(reloaded, px, pmask), logits(adapted.model, px, pmask), rtol=0, atol=1e-5)


def test_fresh_fusion_of_one_adapter_twice_equals_that_adapter(tiny_model_dir, tmp_path, stage_one):
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(stage_one[0], twin)
    fused = AdaptedModel.load(tiny_model_dir, "none", "adapter_fusion",
                              make_config("adapter_fusion", {"adapter_dirs": f"{stage_one[0]},{twin}"}))
    single = get_method("bottleneck").load_adapter(load_base_model(tiny_model_dir, "none"), Path(stage_one[0]))
    x, mask = probe_batch(fused.model.config.vocab_size)
    torch.testing.assert_close(logits(fused.model, x, mask), logits(single, x, mask), rtol=0, atol=1e-5)


def test_fusion_refuses_what_it_cannot_fuse(tiny_model_dir, tmp_path, stage_one):
    with pytest.raises(ConfigError, match="at least two"):
        make_config("adapter_fusion", {"adapter_dirs": stage_one[0]})
    with pytest.raises(ConfigError, match="unknown option"):
        make_config("adapter_fusion", {"adapter_dirs": ",".join(stage_one), "temperature": "2"})
    houlsby = AdaptedModel.load(tiny_model_dir, "none", "bottleneck", make_config("bottleneck", {"style": "houlsby"}))
    houlsby.save_adapter(tmp_path / "houlsby")
    lora = AdaptedModel.load(tiny_model_dir, "none", "lora", make_config("lora", {"r": "2"}))
    lora.save_adapter(tmp_path / "lora")
    for bad, message in [(tmp_path / "houlsby", "style=pfeiffer"), (tmp_path / "lora", "not a bottleneck adapter"),
                         (tmp_path / "missing", "has no adapter_config.json")]:
        with pytest.raises(ConfigError, match=message):
            AdaptedModel.load(tiny_model_dir, "none", "adapter_fusion",
                              make_config("adapter_fusion", {"adapter_dirs": f"{stage_one[0]},{bad}"}))
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
