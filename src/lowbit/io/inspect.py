"""What a model is, read from its headers alone (no weights, no transformers): enough to check a
command's arguments before any work starts.

:func:`inspect_model` reads a GGUF file's header (with lowbit's strict reader), or a Hugging Face
directory's config.json and safetensors headers, or a lowbit checkpoint's manifest, and returns the
tensors' names and shapes (rows first), the architecture, whether the output head is tied to the
embedding, and the longest context the model was built for.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from lowbit.errors import ModelLoadError
from lowbit.model.gguf_file import GGUFFile
from lowbit.model.gguf_mix import ModelInfo, info_from_config, info_from_gguf
from lowbit.model.load import refuse_unsaved_lowbit
from lowbit.model.policy import LINEAR_ROLES, role_of
from lowbit.model.safetensors_check import check_safetensors


@dataclass
class ModelFacts:
    path: Path
    kind: str  # "gguf", "hf" (a Hugging Face directory) or "checkpoint" (lowbit's)
    arch: str
    #: name -> shape (rows first); GGUF names for a GGUF file, Hugging Face names otherwise; None
    #: when the weights' shapes cannot be read without loading them (``*.bin`` files)
    tensors: dict[str, tuple[int, ...]] | None
    tied: bool
    max_ctx: int | None
    info: ModelInfo
    notes: list[str] = field(default_factory=list)

    @property
    def n_params(self) -> int | None:
        if self.tensors is None:
            return None
        n = 0
        for name, shape in self.tensors.items():
            if self.tied and name in ("lm_head.weight", "output.weight"):
                continue
            k = 1
            for d in shape:
                k *= int(d)
            n += k
        return n

    def linear_layers(self) -> dict[str, tuple[int, int]] | None:
        """The decoder blocks' linear layers (what lowbit's formats quantize): name -> (rows, cols)."""
        if self.tensors is None:
            return None
        return {n: (int(s[0]), int(s[1])) for n, s in self.tensors.items()
                if len(s) == 2 and role_of(n) in LINEAR_ROLES and (".layers." in n or n.startswith("blk."))}


def _gguf_facts(path: Path) -> ModelFacts:
    gf = GGUFFile(path)
    arch = gf.field("general.architecture")
    if not isinstance(arch, str):
        raise ModelLoadError(f"{path}: GGUF file has no general.architecture string")
    if gf.field("general.type") == "imatrix":
        raise ModelLoadError(f"{path}: an importance matrix, not a model")
    tensors = {t.name: tuple(int(x) for x in t.shape) for t in gf.tensors.values()}
    fields = {k: kv.value for k, kv in gf.kv.items() if not k.startswith("tokenizer.")}
    ctx = fields.get(f"{arch}.context_length")
    return ModelFacts(path, "gguf", arch, tensors, "output.weight" not in tensors,
                      int(ctx) if isinstance(ctx, int) else None, info_from_gguf(fields, arch))


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory: those its shard index names, else every one."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return sorted(path.glob("*.safetensors"))
    try:
        names = {str(v) for v in json.loads(index.read_text())["weight_map"].values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ModelLoadError(f"{index}: not a safetensors index (no weight_map)") from None
    files = sorted(path / n for n in names)
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"{index}: names {f.name}, which is missing")
    return files


def check_complete(facts: ModelFacts, n_layers: int) -> None:
    """Refuse a directory whose weight files lack tensors every decoder layer has (what layer 0 holds
    is what each of the ``n_layers`` must hold), or the embedding: the file written from it would lack
    them."""
    if facts.tensors is None:
        return
    by_layer: dict[int, set[str]] = {}
    for n in facts.tensors:
        m = re.match(r"(.*\.layers\.)(\d+)\.(.+)$", n)
        if m:
            by_layer.setdefault(int(m.group(2)), set()).add(m.group(3))
    want = by_layer.get(0, set())
    missing = [f"model.layers.{i}.{s}" for i in range(n_layers) for s in sorted(want - by_layer.get(i, set()))]
    if not any(n.endswith("embed_tokens.weight") for n in facts.tensors):
        missing.insert(0, "model.embed_tokens.weight")
    if missing:
        raise ModelLoadError(f"{facts.path}: the weight files do not cover the model: {len(missing)} tensors are "
                             f"missing ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})")


def _dir_facts(path: Path) -> ModelFacts:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path}: not a model directory (no config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{cfg_file}: invalid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{cfg_file}: not a JSON object")
    arch = str(cfg.get("model_type", "?"))
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    ctx = text_cfg.get("max_position_embeddings")
    tied = bool(cfg.get("tie_word_embeddings", text_cfg.get("tie_word_embeddings", False)))
    info = info_from_config(SimpleNamespace(**text_cfg))
    manifest_file = path / "lowbit.json"
    tensors: dict[str, tuple[int, ...]] | None = {}
    kind = "hf"
    files = _weight_files(path)
    for f in files:
        for name, e in check_safetensors(f).items():
            tensors[name] = tuple(e.shape)  # type: ignore[index]
    if manifest_file.is_file():
        kind = "checkpoint"
        try:
            manifest = json.loads(manifest_file.read_text())
            for mname, entry in (manifest.get("modules") or {}).items():
                tensors[f"{mname}.weight"] = tuple(int(x) for x in entry["shape"])  # type: ignore[index]
                for k in [k for k in tensors if k.startswith(f"{mname}.q_")]:  # type: ignore[union-attr]
                    del tensors[k]  # type: ignore[union-attr]
            for pname, entry in (manifest.get("params") or {}).items():
                tensors[pname] = tuple(int(x) for x in entry["shape"])  # type: ignore[index]
                for k in [k for k in tensors if k.startswith(f"{pname}.q_")]:  # type: ignore[union-attr]
                    del tensors[k]  # type: ignore[union-attr]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"{manifest_file}: unreadable lowbit manifest ({exc})") from None
    elif not files:
        if not any(path.glob("*.bin")):
            raise ModelLoadError(f"{path}: no *.safetensors or *.bin weight files")
        tensors = None
    else:
        refuse_unsaved_lowbit(path, cfg, list(tensors))
    facts = ModelFacts(path, kind, arch, tensors, tied, int(ctx) if isinstance(ctx, int) else None, info)
    if kind == "hf":
        check_complete(facts, int(text_cfg.get("num_hidden_layers") or 0))
    return facts


def inspect_model(path: str | os.PathLike[str]) -> ModelFacts:
    """The facts of the model at ``path`` (a GGUF file or a directory), from its headers only."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
        return _gguf_facts(path)
    if path.is_dir():
        return _dir_facts(path)
    raise ModelLoadError(f"{path}: no such file or directory")

