"""Quantize a Hugging Face safetensors directory to GGUF without loading the model.

:func:`write_gguf_streaming` reads the config and tokenizer, then each tensor on its own from the
``*.safetensors`` files (sharded or not; each file opened, memory-mapped, for one tensor and closed
again, so that no mapped pages pile up), converts it to float32, reorders Q/K rows for llama.cpp
and quantizes it with llama.cpp's per-tensor rules (:func:`lowbit.io.gguf_out.write_tensors`).
Memory holds the largest tensor and its quantizer's temporaries, whatever the number of layers.
The bytes are those of the in-memory path (:func:`lowbit.io.hf_gguf.write_gguf_from_hf` on the
model loaded in float32), and the write is resumable: an interrupted run, rerun with the same
arguments, goes on from its last finished tensor (:class:`lowbit.io.gguf_out.Journal`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.io.gguf_out import array_digest, fingerprint, write_tensors
from lowbit.io.hf_gguf import GGUF_ARCH, HFLayout
from lowbit.model.calibrate import CalibConfig, calibrate_layer, calibrated_linears, check_method_formats
from lowbit.model.devices import device_for
from lowbit.model.imatrix import imatrix_chunks
from lowbit.model.layers import capture_layer_inputs, decoder_layers, layers_prefix
from lowbit.model.load import LoadedModel
from lowbit.model.methods import get_method, list_methods
from lowbit.model.quantize import QuantLinear, QuantReport, plan_for
from lowbit.model.recipe import Recipe

#: files besides the weights whose content goes into the output (their changes restart a resumed run)
_META_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "model.safetensors.index.json")


def safetensors_header(f: Path) -> dict[str, dict]:
    """The tensor entries (dtype, shape, data_offsets) of a safetensors file, read from its header."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > size - 8 or n > 100_000_000:
            raise LowbitError(f"{f}: not a safetensors file (header length {n}, file of {size} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LowbitError(f"{f}: safetensors header is not valid JSON") from None
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((int(v["data_offsets"][1]) for v in entries.values()), default=0)
    if 8 + n + end > size:
        raise LowbitError(f"{f}: truncated: its tensors need {8 + n + end} bytes, the file has {size}")
    return entries


def weight_files(path: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Hugging Face tensor name -> (safetensors file, shape) for a model directory, from the shard
    index when there is one (only the files it names are read), else from every ``*.safetensors``."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LowbitError(f"{index}: not a safetensors index (no weight_map)") from None
        files = sorted({path / str(v) for v in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LowbitError(f"{path}: no *.safetensors files")
    out: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in files:
        if not f.is_file():
            raise LowbitError(f"{index}: names {f.name}, which is missing")
        for k, v in safetensors_header(f).items():
            if k in out:
                raise LowbitError(f"{path}: tensor {k} is in both {out[k][0].name} and {f.name}")
            out[k] = (f, tuple(int(x) for x in v["shape"]))
    return out


def can_stream(path: Path) -> bool:
    """Whether ``path`` is a Hugging Face safetensors directory of an architecture GGUF output takes
    (lowbit checkpoints, ``*.bin`` weights and other architectures go through the in-memory path)."""
    cfg = path / "config.json"
    if not path.is_dir() or not cfg.is_file() or (path / "lowbit.json").exists():
        return False
    if not any(path.glob("*.safetensors")):
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") in GGUF_ARCH
    except (json.JSONDecodeError, OSError):
        return False


def _open_dir(path: Path):  # type: ignore[no-untyped-def]
    """What both streaming writers read first: (config, tokenizer, layout, weight files, GGUF name ->
    Hugging Face name, (GGUF name, shape) entries, add_bos, bos id)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        cfg = AutoConfig.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise LowbitError(f"{path}: could not read the config or tokenizer ({type(exc).__name__}: {exc})") from None
    layout = HFLayout(path, str(cfg.model_type), cfg)
    files = weight_files(path)
    hf_of = layout.names(files)
    entries = [(g, files[k][1]) for g, k in hf_of.items()]
    bos = getattr(tok, "bos_token_id", None)
    add_bos = bool(getattr(tok, "add_bos_token", False)) and bos is not None
    return cfg, tok, layout, files, hf_of, entries, add_bos, bos


def _read_tensor(files: dict[str, tuple[Path, tuple[int, ...]]], k: str) -> torch.Tensor:
    """Hugging Face tensor ``k`` as float32, its safetensors file opened (memory-mapped) for it alone."""
    from safetensors import safe_open

    f = files[k][0]
    try:
        with safe_open(str(f), framework="pt") as fh:
            return fh.get_tensor(k).to(torch.float32)
    except Exception as exc:
        raise LowbitError(f"{f}: could not read tensor {k} ({type(exc).__name__}: {exc})") from None


def _inputs(path: Path, files: dict[str, tuple[Path, tuple[int, ...]]]) -> list[Path]:
    """Every file whose change must restart a resumed run: the weights and the metadata files."""
    return sorted({f for f, _ in files.values()} | {path / m for m in _META_FILES if (path / m).is_file()})


def write_gguf_streaming(path: Path, out: Path, fmt_name: str, progress: bool = True,
                         imatrix: dict[str, np.ndarray] | None = None, device: str | torch.device = "cpu",
                         resume: bool = True, notes: list[str] | None = None,
                         device_map: dict[str, str] | None = None, force: bool = False) -> QuantReport:
    """Quantize the Hugging Face directory ``path`` to the GGUF file ``out`` of file type ``fmt_name``
    (``q4_k_m`` ...), one tensor in memory at a time; see the module's docstring.  The quantizers
    run on ``device``, or with a ``device_map`` (:func:`lowbit.model.devices.plan_devices`) each
    tensor on its module's device."""
    path = Path(path)
    _cfg, tok, layout, files, hf_of, entries, add_bos, _bos = _open_dir(path)
    notes = [] if notes is None else notes

    def load(name: str) -> np.ndarray:
        return layout.rows(name, _read_tensor(files, hf_of[name]).numpy())

    fp = None
    if resume:
        fp = fingerprint(_inputs(path, files), format=fmt_name, imatrix=array_digest(imatrix))

    def where(name: str) -> str | torch.device:
        return device if device_map is None else device_for(hf_of[name], device_map)

    return write_tensors(out, layout.arch, layout.metadata(tok, add_bos, notes), entries, load, fmt_name,
                         layout.info(), str(path), progress, imatrix, device=where, fingerprint=fp, force=force)


# ---- GPTQ and AWQ, one decoder layer in memory at a time ------------------------------------
class _CalibratedLayers(Mapping):
    """The decoder layers of a Hugging Face directory, calibrated (GPTQ, AWQ) one at a time as the
    GGUF writer asks for their tensors, in llama.cpp's order (layer by layer).

    The model is built on the meta device; only the token embeddings are loaded, to capture the
    calibration hidden states at the first layer.  Asked for a tensor of layer ``i``, it loads the
    layer's weights from the safetensors files, quantizes it (:func:`lowbit.model.calibrate.calibrate_layer`),
    runs the quantized layer to make the next layer's inputs, keeps the layer's output tensors
    (quantized blocks, norms) until the writer moves on, and frees the layer.  As a mapping it holds
    the calibrated (pre-quantized) GGUF tensors; :meth:`floats` gives the others of a layer.

    For resuming, the hidden states at the input of each layer are saved (atomically) beside the
    output before the layer is quantized; a rerun that resumes inside layer ``i`` starts from them
    instead of recalibrating layers ``0 .. i-1``."""

    def __init__(self, path: Path, hf_cfg: object, layout: HFLayout, files: dict, hf_of: dict[str, str],
                 scheme: str, chunks: torch.Tensor, cfg: CalibConfig, hidden_file: Path | None, key: str,
                 progress: bool) -> None:
        import re

        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(hf_cfg)
        self.model.eval()
        dev = torch.device(getattr(cfg, "device", "cpu"))
        if dev.type != "cpu":  # the real buffers (rotary frequencies ...) go where the layers will run
            for mod in self.model.modules():
                for bk, b in list(mod._buffers.items()):
                    if b is not None and b.device.type != "meta":
                        mod._buffers[bk] = b.to(dev)
        self.layers = decoder_layers(self.model)
        self.prefix = layers_prefix(self.model, self.layers)
        self.choices = plan_for(self.model, scheme)
        self.files, self.hf_of, self.layout = files, hf_of, layout
        self.scheme, self.chunks, self.cfg = scheme, chunks, cfg
        self.hidden_file, self.key, self.progress = hidden_file, key, progress
        pat = re.compile(rf"^{re.escape(self.prefix)}\.(\d+)\.(.+)$")
        self.layer_of: dict[str, tuple[int, str]] = {}  # GGUF name -> (layer, local name)
        for g, k in hf_of.items():
            m = pat.match(k)
            if m:
                self.layer_of[g] = (int(m.group(1)), m.group(2))
        self.calibrated: set[str] = set()
        for i, layer in enumerate(self.layers):
            local = {f"{n}.weight" for n in calibrated_linears(layer, i, self.prefix, self.choices)}
            self.calibrated |= {g for g, (li, n) in self.layer_of.items() if li == i and n in local}
        self.next = 0  # the next layer to calibrate
        self.batches: list | None = None
        self.current: dict[str, object] = {}  # GGUF name -> QTensor or float32 array of the last layer
        self.report = QuantReport(f"{scheme}+{getattr(cfg, 'method', '?')}")
        self.logs: list = []
        self.bar = None

    # Mapping: the calibrated tensors
    def __contains__(self, name: object) -> bool:
        return name in self.calibrated

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(sorted(self.calibrated))

    def __len__(self) -> int:
        return len(self.calibrated)

    def __getitem__(self, name: str):  # type: ignore[no-untyped-def]
        if name not in self.calibrated:
            raise KeyError(name)
        self._ensure(self.layer_of[name][0])
        return self.current[name]

    def is_layer_tensor(self, name: str) -> bool:
        return name in self.layer_of

    def floats(self, name: str) -> np.ndarray:
        """A layer tensor that is not calibrated (a norm, a bias, a layer the plan keeps), after
        its layer was calibrated (AWQ folds its scales into norms and linear layers)."""
        self._ensure(self.layer_of[name][0])
        return self.current[name]  # type: ignore[return-value]

    # the work
    def _start(self, want: int) -> None:
        emb = self.model.get_input_embeddings()
        key = next(k for k in self.files if k.endswith("embed_tokens.weight"))
        emb.load_state_dict({"weight": _read_tensor(self.files, key).to(self.cfg.device)}, assign=True)
        batches = capture_layer_inputs(self.model, self.chunks, self.cfg.batch_size, self.cfg.device)
        emb.to("meta")
        start = 0
        saved = self._load_hidden(want)
        if saved is not None:
            start, hs = saved
            if len(hs) != len(batches):
                raise LowbitError(f"{self.hidden_file}: saved hidden states do not match the calibration batches")
            batches = [(h, kw) for h, (_, kw) in zip(hs, batches, strict=True)]
        self.batches, self.next = batches, start
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(self.layers), initial=start, desc=f"{self.cfg.method} {self.scheme}",
                        unit="layer", disable=not self.progress, leave=False)

    def _load_hidden(self, want: int) -> tuple[int, list[torch.Tensor]] | None:
        if self.hidden_file is None or not self.hidden_file.is_file():
            return None
        try:
            saved = torch.load(self.hidden_file, weights_only=True)
        except Exception:
            return None
        if not isinstance(saved, dict) or saved.get("key") != self.key or not (0 <= int(saved.get("layer", -1)) <= want):
            return None
        return int(saved["layer"]), list(saved["hidden"])

    def _save_hidden(self, layer: int) -> None:
        if self.hidden_file is None or self.batches is None:
            return
        import os

        tmp = self.hidden_file.with_name(self.hidden_file.name + ".tmp")
        with open(tmp, "wb") as fh:
            torch.save({"key": self.key, "layer": layer, "hidden": [h for h, _ in self.batches]}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.hidden_file)

    def _ensure(self, li: int) -> None:
        if li == self.next - 1 and self.current:
            return
        if li < self.next - 1:
            raise LowbitError(f"layer {li} was asked for after layer {self.next - 1}: the writer must go layer by layer")
        if self.batches is None:
            self._start(li)
        while self.next <= li:
            self._calibrate(self.next)

    def _calibrate(self, li: int) -> None:
        self._save_hidden(li)
        layer = self.layers[li]
        mine = {g: n for g, (i, n) in self.layer_of.items() if i == li}
        state = {n: _read_tensor(self.files, self.hf_of[g]).to(self.cfg.device) for g, n in mine.items()}
        expected = set(layer.state_dict().keys())
        if set(state) != expected:
            missing = sorted(expected - set(state))[:3]
            raise LowbitError(f"{self.layout.path}: layer {li} does not match its config (missing {missing}, "
                              f"unexpected {sorted(set(state) - expected)[:3]})")
        layer.load_state_dict(state, assign=True, strict=True)
        del state
        done: set[str] = set()
        self.batches = calibrate_layer(layer, li, self.prefix, self.choices, self.batches, self.cfg,  # type: ignore[arg-type]
                                       self.report, self.logs, done)
        current: dict[str, object] = {}
        for g, n in mine.items():
            mod_name, _, attr = n.rpartition(".")
            mod = layer.get_submodule(mod_name) if mod_name else layer
            if g in self.calibrated:
                assert isinstance(mod, QuantLinear) and attr == "weight"
                current[g] = self.layout.quantized_rows(g, mod.qtensor)
            else:
                current[g] = self.layout.rows(g, getattr(mod, attr).detach().to(torch.float32).cpu().numpy().copy())
        self.current = current
        self.layers[li] = layer.to("meta")  # free the layer's weights
        self.next = li + 1
        if self.bar is not None:
            self.bar.update(1)
            recent = [lg for lg in self.logs if lg.layer == li and lg.rtn_error > 0]
            if recent:
                self.bar.set_postfix(err=f"{sum(lg.error for lg in recent) / sum(lg.rtn_error for lg in recent):.3f}xRTN")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_gguf_calibrated_streaming(path: Path, out: Path, scheme: str | Recipe, cfg: CalibConfig | None, text: str,
                                    progress: bool = True, resume: bool = True,
                                    notes: list[str] | None = None, force: bool = False) -> tuple[QuantReport, list]:
    """A layer-wise method that streams (GPTQ, AWQ) of the Hugging Face directory ``path`` into the
    GGUF file ``out``: ``scheme`` is a :class:`~lowbit.model.recipe.Recipe` (its file type, method
    and calibration settings), or a file type's name with ``cfg`` (a
    :class:`~lowbit.model.calibrate.CalibConfig` naming the method).  Calibrated on ``text``, with
    one decoder layer in memory at a time (plus the calibration hidden states); resumable like
    :func:`write_gguf_streaming`.  Returns the file's report and the per-layer logs."""
    import hashlib

    if isinstance(scheme, Recipe):
        if scheme.scheme.file_type is None:
            raise LowbitError(f"{scheme.label}: a GGUF file takes a llama.cpp file type")
        cfg = dataclasses.replace(cfg or scheme.calib, method=scheme.method.name)
        scheme = scheme.scheme.file_type.name
    cfg = cfg or CalibConfig()
    method = cfg.method
    if not get_method(method).streams:
        streams = [n for n in list_methods() if get_method(n).streams]
        raise LowbitError(f"streaming calibration runs {' and '.join(streams)}, not {method}")
    path = Path(path)
    hf_cfg, tok, layout, files, hf_of, entries, add_bos, bos = _open_dir(path)
    notes = [] if notes is None else notes
    chunks = imatrix_chunks(LoadedModel(None, tok, path, layout.arch, add_bos, bos, None, []),  # type: ignore[arg-type]
                            text, n_ctx=cfg.seq_len, max_chunks=cfg.n_samples)
    if int(chunks.max()) >= int(hf_cfg.vocab_size):
        raise LowbitError(f"{path}: the tokenizer gives token ids up to {int(chunks.max())}, but the model's "
                          f"vocabulary has {hf_cfg.vocab_size} entries")

    fp = None
    key = ""
    if resume:
        fp = fingerprint(_inputs(path, files), format=scheme, method=repr(cfg),
                         calibration=hashlib.sha256(chunks.numpy().tobytes()).hexdigest())
        key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
    hidden_file = out.with_name(f".{out.name}.part-hidden.pt") if resume else None
    if hidden_file is not None and not out.with_name(f".{out.name}.part-resume.json").is_file():
        hidden_file.unlink(missing_ok=True)  # no run to resume: what is there is stale
    torch.manual_seed(getattr(cfg, "seed", 0))
    layers = _CalibratedLayers(path, hf_cfg, layout, files, hf_of, scheme, chunks, cfg, hidden_file, key, progress)
    check_method_formats(layers.choices, method)

    def load(name: str) -> np.ndarray:
        if layers.is_layer_tensor(name):
            return layers.floats(name)
        return layout.rows(name, _read_tensor(files, hf_of[name]).numpy())

    try:
        report = write_tensors(out, layout.arch, layout.metadata(tok, add_bos, notes), entries, load, scheme,
                               layout.info(), str(path), progress, None, prequantized=layers,  # type: ignore[arg-type]
                               fingerprint=fp, force=force)
    finally:
        layers.close()
    if hidden_file is not None:
        hidden_file.unlink(missing_ok=True)
        hidden_file.with_name(hidden_file.name + ".tmp").unlink(missing_ok=True)
    return report, layers.logs
