"""The ``lowbit`` command: quantize, imatrix, eval, compare, generate, import, formats.

Every command checks all of its arguments before it loads a model: option ranges, format names
(with a "did you mean"), that the files it reads exist and that a text holds at least one context,
that the device exists, that an export can hold the format on this model's layers, that a size
target is reachable, and that the output can be written and is not something lowbit must not
replace (:mod:`lowbit.io.outputs`).  ``--dry-run`` stops after these checks and says what would be
done.  Bad input ends in one line, ``lowbit: error: ...``, and exit code 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lowbit.env import __version__
from lowbit.errors import LowbitError
from lowbit.model.methods import get_method, list_methods
from lowbit.model.recipe import Recipe, quantize

DEFAULT_FORMATS = (
    "fp16,bf16,fp8-e4m3,fp8-e5m2,q8_0,int8,q5_1,q5_0,q4_1,q4_0,nf4,nf4-dq,fp4,"
    "int4-g128,int4-asym-g128,int4-asym-g128-clip,int3-asym-g64-clip,int2-asym-g32-clip"
)
#: evaluation chunks of ``eval`` and ``compare`` when --chunks is not given
DEFAULT_CHUNKS = 20
METHOD_CHOICES = tuple(list_methods())
BUNDLED_EVAL = "wiki-eval (gensim's Wikipedia articles, evaluation split)"
BUNDLED_CALIB = "wiki-calib (gensim's Wikipedia articles, calibration split)"


# ---- argument checks ------------------------------------------------------------------------
def _check_ranges(args: argparse.Namespace) -> None:
    """Every numeric option within its range (only the options the command has)."""

    def get(dest: str) -> object:
        return getattr(args, dest, None)

    for dest, opt, lo in (("chunks", "--chunks", 1), ("calib_chunks", "--calib-chunks", 1),
                          ("sens_chunks", "--sens-chunks", 1), ("qat_steps", "--qat-steps", 1),
                          ("qat_batch", "--qat-batch", 1), ("ctx", "--ctx", 8), ("calib_ctx", "--calib-ctx", 8)):
        v = get(dest)
        if v is not None and int(v) < lo:  # type: ignore[call-overload]
            raise LowbitError(f"{opt} {v}: give at least {lo}")
    for dest, opt in (("damp", "--damp"), ("qat_lr", "--qat-lr")):
        v = get(dest)
        if v is not None and not (0.0 < float(v) <= 1.0):  # type: ignore[arg-type]
            raise LowbitError(f"{opt} {v}: give a number in (0, 1]")
    v = get("outliers")
    if v is not None and not (0.0 <= float(v) < 0.5):  # type: ignore[arg-type]
        raise LowbitError(f"--outliers {v}: give a fraction in [0, 0.5)")
    v = get("bits")
    if v is not None and not 2 <= int(v) <= 8:  # type: ignore[call-overload]
        raise LowbitError(f"--bits {v}: give 2 to 8 bits")
    v = get("group_size")
    if v is not None and int(v) < -1:  # type: ignore[call-overload]
        raise LowbitError(f"--group-size {v}: give a number of columns, or 0 for one scale per channel")
    v = get("target_bpw")
    if v is not None and not 1.0 < float(v) <= 32.0:  # type: ignore[arg-type]
        raise LowbitError(f"--target-bpw {v}: give bits per weight between 1 and 32")


def check_device(device: str | None, option: str = "--device") -> str:
    """``device`` as torch names it, or one clear error: cpu, cuda, cuda:N or auto."""
    d = (device or "cpu").strip().lower()
    if d in ("cpu", "auto"):
        return d
    m = re.fullmatch(r"cuda(?::(\d+))?", d)
    if not m:
        raise LowbitError(f"{option} {device}: not a device (use cpu, cuda, cuda:N or auto)")
    import torch

    if torch.version.cuda is None:
        raise LowbitError(f"{option} {device}: this PyTorch build ({torch.__version__}) has no CUDA support; "
                          "use --device cpu")
    if not torch.cuda.is_available():
        raise LowbitError(f"{option} {device}: no CUDA device is visible to PyTorch; use --device cpu")
    n = torch.cuda.device_count()
    if m.group(1) is not None and int(m.group(1)) >= n:
        raise LowbitError(f"{option} {device}: there {'is' if n == 1 else 'are'} {n} CUDA device{'s' * (n != 1)} "
                          f"(cuda:0{f'..cuda:{n - 1}' if n > 1 else ''})")
    return d


def _parse_size(text: str) -> int:
    """'1.2GB', '800MB', '500000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*", text.lower())
    if not m:
        raise LowbitError(f"--target-size {text!r}: give a size such as 1.2GB, 800MB or 90MiB")
    unit = (m.group(2) or "b").rstrip("b") or ""
    mult = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    return int(float(m.group(1)) * mult[unit])


def _inspect(spec: str, option: str = "MODEL"):  # type: ignore[no-untyped-def]
    """The model's facts from its headers (:mod:`lowbit.io.inspect`), with the architecture checked."""
    from lowbit.io.inspect import inspect_model
    from lowbit.model.load import SUPPORTED_ARCHS, resolve_model_path

    facts = inspect_model(resolve_model_path(spec))
    if facts.arch not in SUPPORTED_ARCHS:
        raise LowbitError(f"{facts.path}: architecture '{facts.arch}' is not supported "
                          f"(supported: {', '.join(SUPPORTED_ARCHS)})")
    return facts


def _check_ctx(facts, n_ctx: int | None, option: str) -> None:  # type: ignore[no-untyped-def]
    if n_ctx is not None and facts.max_ctx and n_ctx > facts.max_ctx:
        raise LowbitError(f"{option} {n_ctx}: {facts.path.name} was built for contexts of at most {facts.max_ctx} tokens")


@dataclass
class Text:
    """A text a command reads: the user's file (checked before any model is loaded) or a bundled split."""

    path: Path | None
    option: str
    bundled: str  # "eval" or "calib"
    text: str | None = None

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else (BUNDLED_EVAL if self.bundled == "eval" else BUNDLED_CALIB)

    @property
    def source(self) -> str:
        return f"{self.option} {self.path}" if self.path is not None else self.name

    def read(self) -> str:
        if self.text is None:
            from lowbit.eval import data

            self.text = data.eval_text() if self.bundled == "eval" else data.calibration_text()
        return self.text


def _text(path: str | None, option: str, bundled: str, n_ctx: int) -> Text:
    """The text of ``option``: read and checked now (exists, UTF-8, not empty, long enough in bytes for
    one context of ``n_ctx`` tokens), or the bundled split, read when needed."""
    if not path:
        return Text(None, option, bundled)
    from lowbit.eval.data import check_text_length, read_text_file

    try:
        text = read_text_file(path)
    except LowbitError as exc:
        raise LowbitError(f"{option} {exc}") from None
    check_text_length(path, text, n_ctx, option)
    return Text(Path(path), option, bundled, text)


def _text_fits(texts: list[tuple[Text, int]]):  # type: ignore[no-untyped-def]
    """A ``before_weights`` hook for :func:`lowbit.load_model`: once the tokenizer is loaded, every
    user text holds at least one context of its length (the exact count, before the weights are read)."""

    def check(tok_only) -> None:  # type: ignore[no-untyped-def]
        from lowbit.eval.data import too_short
        from lowbit.eval.runner import tokenize

        for t, n_ctx in texts:
            if t.path is None or t.text is None:
                continue
            n = len(tokenize(tok_only, t.text))
            if n < n_ctx:
                raise too_short(t.source, n, n_ctx)

    return check


def _load(spec: str | Path, quiet: bool, texts: list[tuple[Text, int]] | None = None):  # type: ignore[no-untyped-def]
    from lowbit.model.load import load_model

    return load_model(spec, progress=not quiet, before_weights=_text_fits(texts or []))


def _check_imatrix(path: str | None):  # type: ignore[no-untyped-def]
    if not path:
        return None
    from lowbit.io.imatrix import read_imatrix

    try:
        return read_imatrix(Path(path)).values()
    except LowbitError as exc:
        raise LowbitError(f"--imatrix {exc}") from None


def _dry(args: argparse.Namespace, what: str) -> int:
    print(f"dry run: all arguments checked; would {what}. Nothing was loaded or written.")
    return 0


# ---- formats ---------------------------------------------------------------------------------
def cmd_formats(args: argparse.Namespace) -> int:
    from lowbit.formats import family_info, get_format, list_formats
    from lowbit.io.exports import export_names, get_export
    from lowbit.model.actscheme import parse_act_scheme
    from lowbit.model.gguf_mix import FILE_TYPES
    from lowbit.model.schemes import ACT_EXAMPLES

    shape = (4096, 4096)
    print("Tensor formats (--format; bits per weight of a 4096x4096 matrix, scales included)")
    print(f"  {'name':<28} {'bpw':>8}  description")
    for name in list_formats():
        if "<" in name:
            continue
        f = get_format(name)
        gguf = " [GGUF type]" if f.gguf_type is not None else ""
        print(f"  {name:<28} {f.bits_per_weight(shape):>8.4f}  {f.description}{gguf}")
    for grammar, (desc, examples) in family_info().items():
        print(f"  {grammar:<28} {'':>8}  {desc}")
        for ex in examples:
            f = get_format(ex)
            print(f"    {ex:<26} {f.bits_per_weight(shape):>8.4f}  {f.description}")
    print()
    print("llama.cpp file types (--format with a .gguf --out: llama-quantize's per-tensor mixes and fallbacks; "
          "bpw of the default type)")
    seen = set()
    for name, ft in FILE_TYPES.items():
        if id(ft) in seen or name.endswith("-pure"):
            continue
        seen.add(id(ft))
        desc = ft.description or f"{ft.default.upper()} (llama.cpp's rules for the output and embedding)"
        print(f"  {name:<28} {get_format(ft.default).bits_per_weight(shape):>8.4f}  {desc}")
    print("  (--pure: the file type's default type on every tensor that fits, as llama-quantize --pure)")
    print()
    print("Activation schemes (--format; weights and activations quantized, lowbit checkpoints)")
    for name in ACT_EXAMPLES:
        s = parse_act_scheme(name)
        assert s is not None
        print(f"  {name:<28} {s.wa:>8}  {s.description}")
    print("  (w<2-8>a<2-8>[-static[-minmax|-pct|-mse]], llm-int8[-t<threshold>])")
    print()
    print("Methods (--method, or +method in compare --formats)")
    for name in list_methods():
        m = get_method(name)
        applies = ("weights and activation schemes" if m.weights and m.activations else
                   "activation schemes" if m.activations else "weights")
        print(f"  {name:<28} {'':>8}  {m.description} ({applies}{'; the default' if name == 'rtn' else ''})")
    print()
    print("Output layouts (--out-format, for a directory --out)")
    print(f"  {'lowbit':<28} {'':>8}  lowbit's checkpoint: any format and method; lowbit eval/compare load it")
    for name in export_names():
        print(f"  {name:<28} {'':>8}  {get_export(name).description}")
    print()
    print("Kernel backends (generate --backend; the quantized layers' products)")
    from lowbit.kernels import POLICIES, backends

    for name, text in POLICIES.items():
        print(f"  {name:<28} {'':>8}  {text}")
    for name, b in backends().items():
        print(f"  {name:<28} {b.device:>8}  {b.description}; {'exact' if b.exact else 'rounds'}: {b.bound}")
    return 0


# ---- quantize --------------------------------------------------------------------------------
@dataclass
class QuantizeJob:
    """Everything a quantize command will do, decided and checked before any work."""

    src: Path
    facts: object
    out: Path
    kind: str  # "gguf", "checkpoint" or an export layout
    scheme: str | None
    method: str
    recipe: Recipe | None = None  # None: the budget search chooses every tensor's format
    imatrix: dict | None = None
    calib: Text | None = None
    device: str = "cpu"
    route: str = "memory"  # how: "gguf-file", "gguf-stream", "gguf-calib-stream", "memory"
    budget: dict = field(default_factory=dict)

    def describe(self) -> str:
        what = (f"search a mix of formats for {self.src.name} that fits {self.budget['label']}" if self.budget else
                f"quantize {self.src.name} to {self.scheme}" + ("" if self.method == "rtn" else f" by {self.method}"))
        into = {"gguf": "GGUF file", "checkpoint": "lowbit checkpoint directory"}.get(self.kind, f"{self.kind} directory")
        calib = f", calibrating on {self.calib.name}" if self.calib is not None else ""
        return f"{what}{calib}, and write the {into} {self.out}"


def _scheme_of(args: argparse.Namespace) -> str:
    """The format a quantize command asks for: ``--format`` (or TYPE), or one built from --bits/--group-size."""
    if args.format:
        if args.bits is not None:
            raise LowbitError("give either --format or --bits/--group-size, not both")
        return str(args.format).strip().lower()
    if args.bits is None:
        raise LowbitError("give --format (e.g. q4_k_m, int4-asym-g128; `lowbit formats` lists them) or --bits")
    g = args.group_size
    if args.method == "spqr":
        return f"spqr{args.bits}-g{16 if g is None else g}"
    g = 128 if g is None else g
    gran = "-ch" if g in (0, -1) else f"-g{g}"
    return f"int{args.bits}{'' if args.sym else '-asym'}{gran}"


def _positionals(args: argparse.Namespace) -> None:
    """``lowbit quantize IN OUT TYPE`` and ``IN TYPE`` as llama-quantize takes them, the words in any
    place among the options; OUT and TYPE may also be given as --out and --format."""
    from lowbit.model.gguf_mix import file_type

    words = list(args.rest or [])
    if len(words) > 2:
        raise LowbitError(f"quantize takes MODEL [OUT] [TYPE]; unexpected {' '.join(words[2:])}")
    if len(words) == 2:
        if args.out or args.format:
            raise LowbitError(f"give OUT and TYPE once: as the words {' '.join(words)} or as --out and --format")
        args.out, args.format = words
    elif len(words) == 1:
        w = words[0]
        if args.out and not args.format:
            args.format = w
        elif args.format and not args.out:
            args.out = w
        elif args.out or args.format:
            raise LowbitError(f"unexpected {w}: --out and --format are given")
        elif file_type(w) is not None and not Path(w).exists():  # IN TYPE: llama-quantize names the file for it
            args.format = w
            from lowbit.model.load import resolve_model_path

            args.out = f"{resolve_model_path(args.model).name.removesuffix('.gguf')}-{w.upper()}.gguf"
        else:
            args.out = w
    if not args.out:
        raise LowbitError("give an output: --out FILE.gguf or --out DIRECTORY (or MODEL OUT TYPE as llama-quantize takes them)")


def _check_on_model(facts, recipe: Recipe, has_imatrix: bool, layout: str | None = None) -> None:  # type: ignore[no-untyped-def]
    """What ``recipe`` needs on this model, from one per-tensor plan (with or without the importance
    matrix, as it will be made): llama.cpp's refusals (Q2_K_S without an importance matrix ...), the
    formats the method can produce, and, for an export ``layout``, one format for every linear layer
    that the layout takes, with groups that divide every row.  Shapes unknown before loading: no check."""
    from lowbit.formats import get_format
    from lowbit.io.exports import get_export
    from lowbit.model.policy import plan_model

    if facts.tensors is None or recipe.scheme.act is not None:
        return
    scheme = recipe.scheme.name
    choices = plan_model(list(facts.tensors.items()), scheme, facts.info, facts.tied, has_imatrix=has_imatrix)
    recipe.check_plan(choices)
    if layout is None:
        return
    lin = facts.linear_layers() or {}
    fmts = {n: choices[n].format for n in lin if n in choices and choices[n].quantized}
    kinds = sorted(set(fmts.values()))
    if len(kinds) != 1:
        raise LowbitError(f"--out-format {layout} takes one format for every linear layer; {scheme} gives "
                          f"{', '.join(kinds)} on {facts.path.name} (give a single format such as int4-asym-g64)")
    get_export(layout).check(get_format(kinds[0]), {n: lin[n] for n in fmts})


def plan_quantize(args: argparse.Namespace) -> QuantizeJob:
    from lowbit.io.outputs import GGUF, MODEL_DIR, check_output
    from lowbit.model.load import resolve_model_path

    _positionals(args)
    _check_ranges(args)
    device = check_device(args.device)
    src = resolve_model_path(args.model)
    facts = _inspect(args.model)
    out = Path(args.out)
    to_gguf = out.suffix.lower() == ".gguf"
    layout = args.out_format or ("gguf" if to_gguf else "lowbit")
    if to_gguf and layout != "gguf":
        raise LowbitError(f"--out-format {layout} writes a directory: give an --out without .gguf")
    if layout == "gguf" and not to_gguf:
        raise LowbitError(f"--out-format gguf writes a file: give an --out ending in .gguf, not {out}")
    kind = "gguf" if to_gguf else ("checkpoint" if layout == "lowbit" else layout)
    if kind not in ("gguf", "checkpoint"):
        from lowbit.io.exports import get_export

        get_export(kind)
    imatrix_given = bool(args.imatrix)
    if args.target_bpw is not None or args.target_size is not None:
        job = _plan_budget(args, src, facts, out, kind, device)
    else:
        job = _plan_single(args, src, facts, out, kind, device, imatrix_given)
    check_output(out, GGUF if to_gguf else MODEL_DIR, args.force, "--out")
    return job


def _plan_single(args, src: Path, facts, out: Path, kind: str, device: str,  # type: ignore[no-untyped-def]
                 imatrix_given: bool) -> QuantizeJob:
    from lowbit.io.hf_stream import can_stream
    from lowbit.model.gguf_mix import pure_file_type

    if args.exclude_types or args.types or args.sens_chunks is not None:
        raise LowbitError("--types, --exclude-types and --sens-chunks go with --target-bpw or --target-size")
    scheme = _scheme_of(args)
    if args.pure:
        scheme = pure_file_type(scheme)
    recipe = Recipe.parse(scheme, method=args.method, imatrix=imatrix_given, output=kind)
    s, method, scheme = recipe.scheme, recipe.method.name, recipe.scheme.name
    to_gguf = kind == "gguf"
    if not to_gguf and s.file_type is not None and args.out_format is None:
        raise LowbitError(f"{scheme} is a llama.cpp file type, written as a GGUF file: give an --out ending in .gguf "
                          f"(e.g. {out.name}.gguf), or --out-format lowbit for a lowbit checkpoint in these types")
    imatrix = _check_imatrix(args.imatrix)
    _check_on_model(facts, recipe, imatrix_given, None if kind in ("gguf", "checkpoint") else kind)
    streamed_rtn = to_gguf and method == "rtn" and (src.is_file() or can_stream(src))
    streamed_calib = to_gguf and recipe.method.streams and can_stream(src)
    if device != "cpu" and not streamed_rtn and not (streamed_calib and device != "auto"):
        raise LowbitError("--device is for GGUF output from a .gguf file or a safetensors directory (round-to-"
                          "nearest; GPTQ and AWQ from a safetensors directory take one device, not auto)")
    needs_calib = recipe.needs_calibration
    if needs_calib:
        _check_ctx(facts, args.calib_ctx, "--calib-ctx")
    calib = _text(args.calib_text, "--calib-text", "calib", args.calib_ctx) if needs_calib else None
    if args.calib_text and not needs_calib:
        raise LowbitError(f"--calib-text: {scheme} by {method} uses no calibration text")
    route = ("gguf-file" if src.is_file() else "gguf-stream") if streamed_rtn else (
        "gguf-calib-stream" if streamed_calib else "memory")
    return QuantizeJob(src, facts, out, kind, scheme, method, recipe, imatrix, calib, device, route)


def _plan_budget(args, src: Path, facts, out: Path, kind: str, device: str) -> QuantizeJob:  # type: ignore[no-untyped-def]
    from lowbit.eval import mixsearch as ms

    if args.method != "rtn" or args.format or args.bits is not None or args.pure:
        raise LowbitError("--target-bpw/--target-size choose the format of every tensor themselves; "
                          "drop --format, --bits, --pure and --method")
    if args.target_bpw is not None and args.target_size is not None:
        raise LowbitError("give --target-bpw or --target-size, not both")
    if kind not in ("gguf", "checkpoint"):
        raise LowbitError(f"--out-format {kind} takes one format for every layer; the budget search writes "
                          "a .gguf file or a lowbit checkpoint directory")
    if device != "cpu":
        raise LowbitError("--device: the budget search runs on the CPU")
    target = "gguf" if kind == "gguf" else "lowbit"
    target_bytes = _parse_size(args.target_size) if args.target_size is not None else None
    excluded = {t.strip().lower() for t in (args.exclude_types or "").split(",") if t.strip()}
    pool = tuple(t.strip().lower() for t in args.types.split(",") if t.strip()) if args.types else ms.default_types(target)
    allowed = ms.check_types(tuple(t for t in pool if t not in excluded), target)
    label = f"{args.target_bpw} bits per weight" if target_bytes is None else f"{args.target_size}"
    if facts.tensors is not None:
        lo, hi = ms.size_bounds(list(facts.tensors.items()), facts.tied, target, allowed)
        n = facts.n_params or 1
        want = 8 * target_bytes if target_bytes is not None else args.target_bpw * n
        if want < lo:
            opt = (f"--target-size {args.target_size}" if target_bytes is not None else f"--target-bpw {args.target_bpw}")
            raise LowbitError(f"{opt}: below the smallest this search can make of {facts.path.name}: "
                              f"{lo / 8e6:.1f} MB ({lo / n:.3f} bits per weight) with {', '.join(allowed)}")
        label += f" (reachable: {lo / 8e6:.1f} to {hi / 8e6:.1f} MB)"
    sens_chunks = args.sens_chunks if args.sens_chunks is not None else 8
    _check_ctx(facts, args.calib_ctx, "--calib-ctx")
    calib = _text(args.calib_text, "--calib-text", "calib", args.calib_ctx)
    imatrix = _check_imatrix(args.imatrix)
    budget = {"target": target, "bytes": target_bytes, "bpw": args.target_bpw, "allowed": allowed,
              "sens_chunks": sens_chunks, "label": label}
    return QuantizeJob(src, facts, out, kind, None, "rtn", imatrix=imatrix, calib=calib, device=device, budget=budget)


def cmd_quantize(args: argparse.Namespace) -> int:
    job = plan_quantize(args)
    if args.dry_run:
        return _dry(args, job.describe())
    if job.budget:
        return run_budget(args, job)
    if job.kind == "gguf" and job.route != "memory":
        return run_streamed(args, job)
    return run_in_memory(args, job)


def run_streamed(args: argparse.Namespace, job: QuantizeJob) -> int:
    """GGUF output without the model in memory: tensor by tensor from a GGUF file or a safetensors
    directory (round-to-nearest), or one decoder layer at a time (GPTQ, AWQ); resumable."""
    notes: list[str] = []
    ft_name = job.recipe.scheme.file_type.name  # type: ignore[union-attr]
    if job.route == "gguf-file":
        from lowbit.io.gguf_out import write_gguf

        report = write_gguf(job.src, job.out, ft_name, progress=not args.quiet, imatrix=job.imatrix, resume=True,
                            device=_auto_device(job.device), force=args.force)
        _print_wrote(job.out, report)
        return 0
    if job.route == "gguf-stream":
        from lowbit.io.hf_stream import write_gguf_streaming
        from lowbit.model.devices import plan_devices

        dmap = plan_devices(job.src) if job.device == "auto" else None
        report = write_gguf_streaming(job.src, job.out, ft_name, progress=not args.quiet, imatrix=job.imatrix,
                                      notes=notes, device=job.device, device_map=dmap, force=args.force)
    else:
        from lowbit.io.hf_stream import write_gguf_calibrated_streaming

        cfg = _calib_config(args)
        cfg.device = job.device
        report, logs = write_gguf_calibrated_streaming(job.src, job.out, job.recipe, cfg, job.calib.read(),  # type: ignore[arg-type,union-attr]
                                                       progress=not args.quiet, notes=notes, force=args.force)
        _print_gain(args.method, cfg, logs)
    for n in notes:
        print(f"note: {n}")
    _print_wrote(job.out, report)
    return 0


def _calib_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from lowbit.algorithms.gptq import GPTQConfig
    from lowbit.model.calibrate import CalibConfig

    m = get_method(args.method)
    return CalibConfig(method=m.name if (m.layerwise or m.name == "rtn") else "gptq",
                       n_samples=args.calib_chunks, seq_len=args.calib_ctx,
                       gptq=GPTQConfig(damp=args.damp, act_order=args.act_order),
                       spqr_outliers=args.outliers, smooth_alpha=args.alpha)


def _qat_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from lowbit.model.qat import QATConfig

    return QATConfig(steps=args.qat_steps, lr=args.qat_lr, batch_size=args.qat_batch)


def _auto_device(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def run_in_memory(args: argparse.Namespace, job: QuantizeJob) -> int:
    """Load the model, quantize it in memory, write a GGUF file, a lowbit checkpoint or an export."""
    from lowbit.model.imatrix import imatrix_chunks

    recipe = job.recipe.with_settings(_calib_config(args), _qat_config(args))  # type: ignore[union-attr]
    cfg = recipe.calib
    loaded = _load(job.src, args.quiet, [(job.calib, cfg.seq_len)] if job.calib is not None else [])
    chunks = imatrix_chunks(loaded, job.calib.read(), n_ctx=cfg.seq_len, max_chunks=cfg.n_samples,  # type: ignore[union-attr]
                            source=job.calib.source) if recipe.needs_calibration else None  # type: ignore[union-attr]
    report = quantize(loaded, recipe, chunks=chunks, imatrix=job.imatrix, progress=not args.quiet)
    _print_method(recipe, report, chunks)
    scheme, method = recipe.scheme.name, recipe.method.name
    if job.kind == "gguf":
        from lowbit.io.hf_gguf import write_gguf_from_hf

        write_gguf_from_hf(loaded, job.out, recipe.scheme.file_type.name, progress=not args.quiet,  # type: ignore[union-attr]
                           force=args.force)
    elif job.kind == "checkpoint":
        from lowbit.io.checkpoint import save_checkpoint

        save_checkpoint(loaded, job.out, scheme, method, force=args.force)
    else:
        from lowbit.io.exports import export

        export(loaded, job.out, job.kind, force=args.force)
    for n in loaded.notes:
        print(f"note: {n}")
    _print_wrote(job.out, report)
    return 0


def run_budget(args: argparse.Namespace, job: QuantizeJob) -> int:
    """--target-bpw / --target-size: per-tensor sensitivities (measured once and cached), the mix with
    the least predicted KL divergence that fits, then the file: a GGUF file of llama.cpp types, or a
    lowbit checkpoint of any of lowbit's formats."""
    from lowbit.eval import mixsearch as ms
    from lowbit.model.imatrix import imatrix_chunks

    b = job.budget
    target, allowed, sens_chunks = b["target"], b["allowed"], b["sens_chunks"]
    ctx = args.calib_ctx
    loaded = _load(job.src, args.quiet, [(job.calib, ctx)])  # type: ignore[list-item]
    text = job.calib.read()  # type: ignore[union-attr]
    # --sens-chunks bounds all of the calibration: the importance matrix is measured on the same chunks
    chunks = imatrix_chunks(loaded, text, n_ctx=ctx, max_chunks=sens_chunks, source=job.calib.source)  # type: ignore[union-attr]
    imatrix = job.imatrix
    if imatrix is None:
        from lowbit.model.imatrix import compute_imatrix

        imatrix = compute_imatrix(loaded, text, n_ctx=ctx, max_chunks=sens_chunks, dataset=job.calib.name,  # type: ignore[union-attr]
                                  progress=not args.quiet).values()
    sens, reused = ms.cached_measure(loaded, job.src, chunks, imatrix, target=target, allowed=allowed,
                                     progress=not args.quiet, key_extra={"imatrix": args.imatrix or "sens-chunks"})
    budget = sens.budget_for_bpw(b["bpw"]) if b["bytes"] is None else 8 * b["bytes"]
    mix, sol = ms.search(sens, budget)
    measured = ms.validate(loaded, sens, {"searched": mix}, chunks, imatrix)["searched"][1]  # on a copy
    if target == "gguf":
        from lowbit.io.hf_gguf import write_gguf_from_hf

        report = write_gguf_from_hf(loaded, job.out, "q4_k_m", progress=not args.quiet, imatrix=imatrix,
                                    types=dict(mix), force=args.force)
    else:
        from lowbit.io.checkpoint import save_checkpoint

        report = ms.apply_mix(loaded, mix, imatrix, progress=not args.quiet, target=target)
        save_checkpoint(loaded, job.out, "mix", "rtn", extra={"mix": dict(mix), "predicted_kld": sol.loss,
                                                               "calibration_kld": measured, "budget_bits": budget},
                        force=args.force)
    how = f"reused from {reused}" if reused else f"measured in {sens.seconds:.0f} s (cached for later runs)"
    print(f"sensitivities of {len(sens.tensors)} tensors on {sens.tokens} calibration tokens {how}")
    print(f"budget {budget / 8e6:.2f} MB ({budget / sens.n_params:.3f} bits/weight): chose {sol.bits / 8e6:.2f} MB "
          f"({sol.bits / sens.n_params:.3f} bits/weight); predicted KLD {sol.loss:.5f}, measured {measured:.5f} "
          f"on the calibration chunks")
    _print_wrote(job.out, report)
    return 0


def _size_of(out: Path) -> int:
    if out.is_dir():
        return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return out.stat().st_size


def _print_wrote(out: Path, report) -> None:  # type: ignore[no-untyped-def]
    """The last line of a quantization: the output, its size on disk, the size and bits per weight of
    its tensors (the same figures compare reports) and how many tensors went into each type."""
    counts = ", ".join(f"{k} {v}" for k, v in sorted(report.counts().items()))
    if report.details.get("journal"):
        print(f"note: {report.details['journal']}")
    size = _size_of(out)
    print(f"wrote {out}: {size / 1e6:.1f} MB on disk; weights {report.size_bytes / 1e6:.1f} MB, "
          f"{report.bits_per_weight:.3f} bits/weight ({counts})")


def _print_gain(method: str, cfg, logs: list, n_chunks: int | None = None) -> None:  # type: ignore[no-untyped-def]
    """One line: the calibrated layers' output error as a share of round-to-nearest's."""
    rtn = sum(lg.rtn_error for lg in logs if lg.rtn_error > 0)
    if not logs or rtn <= 0:
        return
    gain = sum(lg.error for lg in logs if lg.rtn_error > 0) / rtn
    chunks = f"{n_chunks} x {cfg.seq_len}" if n_chunks is not None else f"up to {cfg.n_samples} x {cfg.seq_len}"
    print(f"{method}: {chunks} calibration tokens; layer output error {100 * gain:.1f}% of round-to-nearest's "
          "(summed over layers)")


def _print_method(recipe: Recipe, report, chunks) -> None:  # type: ignore[no-untyped-def]
    """What the method measured on the way: QAT's losses, SmoothQuant's alphas, a layer-wise method's gain."""
    m = recipe.method.name
    if m == "qat":
        res, qcfg = report.measured["training"], report.measured["qat"]
        print(f"qat: {len(res.losses)} steps of {qcfg.batch_size} x {recipe.calib.seq_len} tokens in {res.seconds:.0f} s; "
              f"distillation loss {res.losses[0]:.4f} -> {sum(res.losses[-10:]) / len(res.losses[-10:]):.4f} "
              "(mean of the last 10 steps)")
    elif "smoothing" in report.details:
        from lowbit.model.actquant import describe_smoothing

        print(describe_smoothing(report.details["smoothing"]))
    elif recipe.method.layerwise:
        _print_gain(m, recipe.calib, report.logs, len(chunks))


# ---- import, imatrix -------------------------------------------------------------------------
def cmd_import(args: argparse.Namespace) -> int:
    from lowbit.io.outputs import MODEL_DIR, check_output

    facts = _inspect(args.model)
    if facts.kind != "gguf":
        raise LowbitError(f"{facts.path}: import reads a GGUF file")
    out = check_output(args.out, MODEL_DIR, args.force, "--out")
    if args.dry_run:
        return _dry(args, f"write {facts.path.name}'s weights in {args.dtype} as the Hugging Face directory {out}")
    from lowbit.io.hf_import import import_gguf

    import_gguf(facts.path, out, args.dtype, progress=not args.quiet, force=args.force)
    print(f"wrote {out}: a Hugging Face model directory, {_size_of(out) / 1e6:.1f} MB ({args.dtype})")
    return 0


def cmd_imatrix(args: argparse.Namespace) -> int:
    from lowbit.io.outputs import IMATRIX, check_output

    _check_ranges(args)
    facts = _inspect(args.model)
    _check_ctx(facts, args.calib_ctx, "--calib-ctx")
    out = Path(args.out)
    legacy = (out.suffix.lower() == ".dat") if args.out_format is None else args.out_format == "dat"
    text = _text(args.calib_text, "--calib-text", "calib", args.calib_ctx)
    check_output(out, IMATRIX, args.force, "--out")
    if args.dry_run:
        return _dry(args, f"compute {facts.path.name}'s importance matrix on {text.name} and write {out} "
                          f"({'legacy .dat' if legacy else 'GGUF'})")
    from lowbit.io.imatrix import write_imatrix
    from lowbit.model.imatrix import compute_imatrix

    loaded = _load(facts.path, args.quiet, [(text, args.calib_ctx)])
    im = compute_imatrix(loaded, text.read(), n_ctx=args.calib_ctx, max_chunks=args.calib_chunks, dataset=text.name,
                         progress=not args.quiet, source=text.source)
    write_imatrix(im, out, legacy=legacy, force=args.force)
    tokens = int(max(e.counts.max() for e in im.entries.values()))
    print(f"wrote {out}: {len(im.entries)} tensors, {im.chunk_count} chunks of {im.chunk_size} tokens "
          f"({tokens} tokens) of {text.name}")
    return 0


# ---- eval, compare ---------------------------------------------------------------------------
def _in_memory_scheme(args: argparse.Namespace, facts, path: Path, static_hint: str, verb: str):  # type: ignore[no-untyped-def]
    """eval's and generate's --format (quantized in memory, so no static activation ranges) and
    --engine (llama.cpp runs a GGUF file as it is) checked on the model's shapes."""
    recipe = Recipe.parse(args.format) if args.format else None
    if recipe is not None and recipe.needs_calibration:
        what = ("static activation ranges need" if recipe.method.name == "rtn" else f"{recipe.method.name} needs")
        raise LowbitError(f"--format {recipe.label}: {what} calibration; " + static_hint.format(name=recipe.label))
    if recipe is not None and recipe.imatrix:
        raise LowbitError(f"--format {recipe.label}: the importance matrix needs calibration; "
                          + static_hint.format(name=recipe.label))
    if recipe is not None:
        _check_on_model(facts, recipe, False)
    if args.engine == "llama.cpp":
        import importlib.util

        if facts.kind != "gguf":
            raise LowbitError(f"{path}: --engine llama.cpp {verb} a GGUF file")
        if recipe is not None:
            raise LowbitError("--engine llama.cpp runs the file as it is; drop --format")
        if importlib.util.find_spec("llama_cpp") is None:
            raise LowbitError("--engine llama.cpp needs llama-cpp-python (bash scripts/install.sh builds it)")
    return recipe


def cmd_eval(args: argparse.Namespace) -> int:
    from lowbit.io.outputs import REPORT, check_output
    from lowbit.model.load import resolve_model_path

    _check_ranges(args)
    path = resolve_model_path(args.model)
    facts = _inspect(args.model)
    _check_ctx(facts, args.ctx, "--ctx")
    ref_facts = _inspect(args.reference, "--reference") if args.reference else None
    scheme = _in_memory_scheme(args, facts, path, "measure it with lowbit compare --formats {name}",
                               "evaluates")
    text = _text(args.text, "--text", "eval", args.ctx)
    if args.json:
        check_output(args.json, REPORT, False, "--json", replace_own=True)
    same = ref_facts is not None and ref_facts.path.resolve() == facts.path.resolve()
    self_only = scheme is None and args.engine == "torch" and (ref_facts is None or same)
    if args.dry_run:
        return _dry(args, f"evaluate {path.name} on {args.chunks} chunks of {args.ctx} tokens of {text.name}")
    from lowbit.eval.runner import Evaluation, torch_logits_fn

    llm = None
    if args.engine == "llama.cpp":
        from lowbit.eval.llamacpp import LlamaCppModel

        llm = LlamaCppModel(path, n_ctx=args.ctx)  # a file llama.cpp refuses fails here, before any evaluation
    ref = _load(args.reference or args.model, args.quiet, [(text, args.ctx)])
    # the model under test is loaded before anything is evaluated (without --reference, MODEL is the
    # original, quantized in memory after the original's pass)
    model = _load(args.model, args.quiet).model if args.reference and llm is None and not self_only else ref.model
    ev = Evaluation(ref, text.read(), n_ctx=args.ctx, max_chunks=args.chunks, progress=not args.quiet,
                    source=text.source)
    if self_only and not args.quiet:
        print(f"lowbit: warning: {path.name} is compared with no other model (give --reference ORIGINAL, or "
              "--format to quantize it first): perplexity only, no KLD", file=sys.stderr)
    label = scheme.label if scheme is not None else path.name
    size: float | None = float(path.stat().st_size) if path.is_file() and scheme is None else None
    bpw: float | None = None
    try:
        if self_only and llm is None:
            res = ev.run(torch_logits_fn(ref.model, args.ctx), label)
            base = None
        else:
            base = ev.run(torch_logits_fn(ref.model, args.ctx), "original", as_reference=True)
            if llm is not None:
                res = ev.run(llm.logits_fn(), f"{label} (llama.cpp)")
            else:
                if scheme is not None:
                    report = quantize(model, scheme, progress=not args.quiet)
                    size, bpw = float(report.size_bytes), report.bits_per_weight
                res = ev.run(torch_logits_fn(model, args.ctx), label)
    finally:
        ev.close()
        if llm is not None:
            llm.close()
    print(f"text: {text.name}, {int(res['tokens'])} scored tokens in {int(res['chunks'])} chunks of {args.ctx}")
    if base is not None:
        print(f"original PPL {base['ppl']:.4f} ± {base['ppl_err']:.4f}")
    line = f"{label}: PPL {res['ppl']:.4f} ± {res['ppl_err']:.4f}"
    if "kld_mean" in res and base is not None:
        line += f", KLD mean {res['kld_mean']:.6f}, p99 {res['kld_p99']:.5f}, same top token {100 * res['same_top']:.2f}%"
    if bpw is not None:
        line += f", {bpw:.3f} bits/weight"
    if size is not None:
        line += f", {size / 1e6:.1f} MB"
    print(line)
    if args.json:
        from lowbit.eval.report import write_report_json

        write_report_json(Path(args.json), {"original": base, "result": res, "bits_per_weight": bpw, "size_bytes": size})
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from lowbit.kernels import check_backend
    from lowbit.model.load import resolve_model_path

    path = resolve_model_path(args.model)
    facts = _inspect(args.model)
    if args.n_predict < 1:
        raise LowbitError(f"-n {args.n_predict}: give at least 1 token")
    if args.temperature < 0:
        raise LowbitError(f"--temperature {args.temperature}: give 0 (greedy) or more")
    if not 0.0 < args.top_p <= 1.0:
        raise LowbitError(f"--top-p {args.top_p}: give a number in (0, 1]")
    if args.threads is not None and args.threads < 1:
        raise LowbitError(f"--threads {args.threads}: give at least 1")
    device = check_device(args.device)
    try:
        check_backend(args.backend)
    except LowbitError as exc:
        raise LowbitError(f"--backend {exc}") from None
    scheme = _in_memory_scheme(args, facts, path, "quantize with lowbit quantize -f {name} -o DIR, then "
                               "generate from DIR", "runs")
    if args.engine == "llama.cpp" and device != "cpu":
        raise LowbitError("--engine llama.cpp: this build of llama.cpp runs on the CPU; drop --device")
    if args.json:
        from lowbit.io.outputs import REPORT, check_output

        check_output(args.json, REPORT, False, "--json", replace_own=True)
    if args.dry_run:
        what = f"quantize {path.name} to {scheme.label} in memory and " if scheme is not None else ""
        return _dry(args, f"{what}generate {args.n_predict} tokens with {args.engine}")
    import torch

    from lowbit.eval.generate import generate_llamacpp, generate_torch, prompt_ids

    if args.threads:
        torch.set_num_threads(args.threads)

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if args.engine == "llama.cpp":
        from lowbit.model.load import load_tokenizer

        tok = load_tokenizer(args.model)
        ids = prompt_ids(tok, args.prompt, args.chat)
        gen = generate_llamacpp(path, ids, args.n_predict, args.temperature, args.top_p, args.seed, args.threads,
                                tok.tokenizer, show)
        backends = "llama.cpp"
    else:
        loaded = _load(args.model, args.quiet)
        ids = prompt_ids(loaded, args.prompt, args.chat)
        label = path.name
        if scheme is not None:
            quantize(loaded.model, scheme, progress=not args.quiet)
            label = scheme.label
        from lowbit.model.quantize import QuantLinear, set_backend

        set_backend(loaded, args.backend)
        if device != "cpu":
            loaded.model.to(_auto_device(device))
        used = sorted({m.kernel.backend for m in loaded.model.modules() if isinstance(m, QuantLinear)})
        backends = ", ".join(used) if used else "float"
        gen = generate_torch(loaded, ids, args.n_predict, args.temperature, args.top_p, args.seed, show, label)
    print()
    print(f"prefill {len(gen.prompt_ids)} tokens at {gen.prefill_tokens_per_s:.1f} tokens/s; decode "
          f"{gen.n_new_tokens} tokens at {gen.decode_tokens_per_s:.2f} tokens/s; peak RSS {gen.peak_rss_mb:.0f} MB "
          f"({gen.engine}: {backends})")
    if args.json:
        from lowbit.eval.report import write_report_json

        doc = {k: v for k, v in gen.summary().items() if k not in ("prompt_ids", "new_ids")}
        doc["format"] = gen.format
        doc["backends"] = backends
        write_report_json(Path(args.json), doc)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from lowbit.algorithms.gptq import GPTQConfig
    from lowbit.eval.compare import default_out_dir
    from lowbit.io.outputs import REPORT, check_output
    from lowbit.model.calibrate import CalibConfig

    _check_ranges(args)
    facts = _inspect(args.model)
    _check_ctx(facts, args.ctx, "--ctx")
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not formats:
        raise LowbitError("--formats: give at least one format")
    specs = [Recipe.parse(f) for f in formats]
    for s in specs:  # what a file type needs on this model (Q2_K_S: an importance matrix ...), what a method takes
        _check_on_model(facts, s, s.imatrix)
    if any(s.needs_calibration or s.imatrix for s in specs):
        _check_ctx(facts, args.calib_ctx, "--calib-ctx")
    imatrix = _check_imatrix(args.imatrix)
    text = _text(args.text, "--text", "eval", args.ctx)
    calib = _text(args.calib_text, "--calib-text", "calib", args.calib_ctx)
    out_dir = Path(args.out) if args.out else default_out_dir(facts.path.name)
    if out_dir.exists() and not out_dir.is_dir():
        raise LowbitError(f"--out {out_dir}: is a file; compare writes compare.md, .json and .png into a directory")
    for name in ("compare.md", "compare.json", "compare.png"):
        check_output(out_dir / name, REPORT, False, "--out", replace_own=True)
    if args.dry_run:
        return _dry(args, f"compare {len(specs)} formats of {facts.path.name} on {args.chunks} chunks of {args.ctx} "
                          f"tokens of {text.name} and write {out_dir}/compare.md, .json and .png")
    from lowbit.eval.compare import compare
    from lowbit.eval.report import markdown_table, plot, summary, write_json, write_markdown

    texts = [(text, args.ctx), (calib, args.calib_ctx)]
    loaded = _load(facts.path, args.quiet, texts)
    cfg = CalibConfig(n_samples=args.calib_chunks, seq_len=args.calib_ctx, gptq=GPTQConfig(damp=args.damp),
                      smooth_alpha=args.alpha)
    cmp = compare(loaded, formats, text=text.read(), text_name=text.name, n_ctx=args.ctx, max_chunks=args.chunks,
                  progress=not args.quiet, imatrix=imatrix, calib=cfg, calib_text=calib.text, qat=_qat_config(args))
    print(summary(cmp))
    for n in cmp.notes:
        print(f"note: {n}")
    print(markdown_table(cmp, times=True))
    write_json(cmp, out_dir / "compare.json")
    plot(cmp, out_dir / "compare.png")
    write_markdown(out_dir / "compare.md", summary(cmp) + "\n\n" + markdown_table(cmp, times=True) + "\n")
    print(f"wrote {out_dir / 'compare.md'}, {out_dir / 'compare.json'}, {out_dir / 'compare.png'}")
    return 0


# ---- the parser ------------------------------------------------------------------------------
def _alpha(value: str) -> float | None:
    from lowbit.model.recipe import parse_alpha

    try:
        return parse_alpha(value)
    except LowbitError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``lowbit: error: ...`` and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        m = re.match(r"argument (\S+): invalid choice: '([^']*)'", message)
        if m:
            from lowbit.errors import did_you_mean

            choices = re.findall(r"'([^']*)'", message.split("choose from", 1)[-1])
            message += did_you_mean(m.group(2), choices)
        print(f"lowbit: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


class _Help(argparse.HelpFormatter):
    """Every option's default in its help line."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or action.option_strings == [] or "default" in h:
            return h
        return f"{h} (default: %(default)s)"


def _alias(sp: argparse.ArgumentParser, old: str, dest: str, **kw: object) -> None:
    """An old spelling of an option, still accepted, not shown in --help."""
    sp.add_argument(old, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)  # type: ignore[arg-type]


def _calib_options(sp: argparse.ArgumentParser, chunks: int) -> None:
    sp.add_argument("--calib-text", metavar="FILE", help="calibration text, UTF-8 (default: the bundled Wikipedia "
                                                         "calibration split, disjoint from the evaluation text)")
    sp.add_argument("--calib-chunks", type=int, default=chunks, metavar="N",
                    help="calibration chunks" + (" (default: every chunk of the text)" if chunks is None else ""))
    sp.add_argument("--calib-ctx", type=int, default=512, metavar="TOKENS", help="tokens per calibration chunk")
    _alias(sp, "--calib-samples", "calib_chunks", type=int)
    _alias(sp, "--calib-len", "calib_ctx", type=int)


def _eval_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--text", metavar="FILE", help="UTF-8 text to evaluate on (default: the bundled Wikipedia "
                                                   "evaluation split)")
    sp.add_argument("--ctx", type=int, default=512, metavar="TOKENS", help="tokens per evaluation chunk")
    sp.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS, metavar="N",
                    help="evaluation chunks (the first N of the text; llama-perplexity scores the second half of each)")


def _common(sp: argparse.ArgumentParser, force: bool = True) -> None:
    if force:
        sp.add_argument("--force", action="store_true", help="replace an earlier output of lowbit's (never a file "
                                                             "lowbit did not write)")
    sp.add_argument("--dry-run", action="store_true", help="check every argument, say what would be done, stop")
    sp.add_argument("--quiet", "-q", action="store_true", help="no progress bars or warnings: stderr holds errors only")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lowbit", description="Quantize LLMs, write files other engines load, and measure what each "
                                           "format costs.", formatter_class=_Help)
    p.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=_Parser)

    def cmd(name: str, help: str, func) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
        sp = sub.add_parser(name, help=help, description=help, formatter_class=_Help)
        sp.set_defaults(func=func)
        return sp

    cmd("formats", "list the tensor formats, llama.cpp file types, activation schemes, methods and output layouts",
        cmd_formats)

    sp = cmd("quantize", "quantize a model into a GGUF file, a lowbit checkpoint or another engine's layout",
             cmd_quantize)
    sp.add_argument("model", metavar="MODEL", help="a .gguf file, a Hugging Face directory, or 'smollm2'")
    sp.add_argument("rest", nargs="*", metavar="OUT TYPE", help="as llama-quantize takes them: output and type "
                                                                 "(the same as --out and --format)")
    sp.add_argument("--format", "-f", metavar="TYPE",
                    help="llama.cpp file type (q4_k_m, q3_k_s, iq4_xs ...), lowbit format (int4-asym-g128, nf4, e8p "
                         "...) or activation scheme (w8a8 ...); `lowbit formats` lists them")
    sp.add_argument("--out", "-o", metavar="PATH", help="a .gguf file (llama.cpp types), or a directory (a lowbit "
                                                        "checkpoint, or --out-format's layout)")
    sp.add_argument("--method", "-m", default="rtn", choices=METHOD_CHOICES,
                    help="how codes are chosen: round to nearest, a calibration method, SmoothQuant (with an "
                         "activation scheme) or quantization-aware training")
    sp.add_argument("--out-format", choices=("gguf", "lowbit", "compressed-tensors", "bitsandbytes", "gptq", "awq"),
                    help="the output's layout (default: gguf for a .gguf --out, lowbit's checkpoint for a directory); "
                         "compressed-tensors (transformers, vLLM): 4/8-bit integer formats; bitsandbytes: nf4/fp4; "
                         "gptq: 2/3/4/8-bit integer formats; awq: 4-bit zero-point; groups must divide every row")
    sp.add_argument("--pure", action="store_true", help="with a llama.cpp file type: its default type on every "
                                                        "tensor that fits, as llama-quantize --pure")
    sp.add_argument("--imatrix", metavar="FILE", help="importance matrix (llama.cpp's GGUF or legacy .dat, or lowbit's)")
    sp.add_argument("--bits", type=int, help="with --method: integer bits (builds int<bits>[-asym]-g<group>, or spqr<bits>)")
    sp.add_argument("--group-size", type=int, metavar="N", help="with --bits: columns per scale (128; SpQR 16; 0: "
                                                                "one per channel)")
    sp.add_argument("--sym", action="store_true", help="with --bits: symmetric (absmax) instead of zero-point")
    sp.add_argument("--no-act-order", dest="act_order", action="store_false",
                    help="GPTQ/QuIP: quantize columns left to right instead of by decreasing importance")
    sp.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, as a fraction of the mean Hessian diagonal")
    sp.add_argument("--outliers", type=float, default=0.01, help="SpQR: fraction of weights kept as FP16 outliers")
    sp.add_argument("--alpha", type=_alpha, default=0.5,
                    help="SmoothQuant's migration strength in [0, 1], or 'auto': searched per group of layers")
    _calib_options(sp, 128)
    sp.add_argument("--target-bpw", type=float, metavar="BITS",
                    help="choose every tensor's format to fit this many bits per weight with the least predicted KL "
                         "divergence: llama.cpp types for a .gguf --out, any lowbit format for a directory")
    sp.add_argument("--target-size", metavar="SIZE", help="the same for a size of the weights, e.g. 90MB or 1.2GB")
    sp.add_argument("--sens-chunks", type=int, metavar="N", help="with a target: calibration chunks for the "
                                                                 "importance matrix and the sensitivities (8)")
    sp.add_argument("--types", help="with a target: the candidate formats, comma-separated (for a .gguf every "
                                    "llama.cpp type lowbit writes; for a checkpoint int2..int8 per group or channel, "
                                    "nf4, nf4-dq, fp8-e4m3-ch, fp16)")
    sp.add_argument("--exclude-types", help="with a target: formats the search must not use (e.g. q4_1, the type a "
                                            "model was distributed in, which reproduces it for free)")
    sp.add_argument("--qat-steps", type=int, default=100, help="QAT: optimizer steps")
    sp.add_argument("--qat-lr", type=float, default=5e-5, help="QAT: peak learning rate")
    sp.add_argument("--qat-batch", type=int, default=2, help="QAT: calibration chunks per step")
    sp.add_argument("--device", default="cpu", help="GGUF output by round to nearest: where the quantizers run (cpu, "
                                                    "cuda, cuda:N), or 'auto': each layer on the GPU accelerate's "
                                                    "device map gives it")
    _common(sp)

    sp = cmd("imatrix", "compute an importance matrix from calibration text (llama-imatrix's file)", cmd_imatrix)
    sp.add_argument("model", metavar="MODEL", help="a .gguf file, a Hugging Face directory, or 'smollm2'")
    sp.add_argument("--out", "-o", required=True, metavar="FILE", help="output: .gguf (llama.cpp's format) or .dat (legacy)")
    sp.add_argument("--out-format", choices=("gguf", "dat"), help="file format (default: from the name; GGUF "
                                                                  "unless it ends in .dat)")
    _alias(sp, "--output-format", "out_format", choices=("gguf", "dat"))
    _calib_options(sp, None)  # type: ignore[arg-type]
    _alias(sp, "--text", "calib_text")
    _alias(sp, "--chunks", "calib_chunks", type=int)
    _alias(sp, "--ctx", "calib_ctx", type=int)
    _common(sp)

    sp = cmd("eval", "perplexity, and KLD / same-top-token against the original", cmd_eval)
    sp.add_argument("model", metavar="MODEL", help="the model to evaluate (a .gguf file, a directory, or 'smollm2')")
    sp.add_argument("--format", "-f", help="quantize MODEL in memory with this format first (MODEL is then the original)")
    sp.add_argument("--reference", metavar="ORIGINAL", help="the original to compare with (without it and without "
                                                            "--format: perplexity only)")
    sp.add_argument("--engine", choices=("torch", "llama.cpp"), default="torch",
                    help="run MODEL with lowbit's PyTorch path or with llama.cpp (GGUF files)")
    sp.add_argument("--json", metavar="FILE", help="also write the results to this JSON file")
    _eval_options(sp)
    _common(sp, force=False)

    sp = cmd("compare", "quantize into several formats and tabulate the loss of each, with a plot", cmd_compare)
    sp.add_argument("model", nargs="?", default="smollm2", metavar="MODEL",
                    help="the model (default: the bundled SmolLM2-135M)")
    sp.add_argument("--formats", default=DEFAULT_FORMATS,
                    help="comma-separated formats or llama.cpp file types; '+imatrix' quantizes with the importance "
                         "matrix, '+gptq', '+awq', '+quip', '+spqr' with a calibration method (int4-asym-g128+gptq, "
                         "q3_k_m+gptq, spqr3-g16+spqr); activation schemes (w8a8, w4a4, w8a8-static[-pct|-mse], "
                         "w8a8-fp8, llm-int8) with '+smoothquant'; '+qat' fine-tunes any of them")
    sp.add_argument("--imatrix", metavar="FILE", help="importance matrix for the '+imatrix' entries (default: computed "
                                                      "from the calibration text)")
    _calib_options(sp, 128)
    sp.add_argument("--damp", type=float, default=0.01, help="GPTQ/QuIP/SpQR damping (fraction of the mean Hessian "
                                                             "diagonal)")
    sp.add_argument("--alpha", type=_alpha, default=0.5,
                    help="SmoothQuant's migration strength for '+smoothquant' (a number or 'auto'; an entry may set "
                         "its own: 'w8a8+smoothquant=auto')")
    sp.add_argument("--qat-steps", type=int, default=100, help="QAT steps for '+qat' entries")
    sp.add_argument("--qat-lr", type=float, default=5e-5, help="QAT peak learning rate")
    sp.add_argument("--qat-batch", type=int, default=2, help="QAT calibration chunks per step")
    sp.add_argument("--out", "-o", metavar="DIR", help="where compare.md, .json and .png go (default: runs/<model>)")
    _alias(sp, "--out-dir", "out")
    _eval_options(sp)
    _common(sp, force=False)

    sp = cmd("generate", "generate text, streamed as it comes, and time it: prefill and decode tokens/s, peak "
                         "memory", cmd_generate)
    sp.add_argument("model", metavar="MODEL", help="a .gguf file, a Hugging Face directory, a lowbit checkpoint, or "
                                                   "'smollm2'")
    sp.add_argument("--format", "-f", metavar="TYPE", help="quantize MODEL in memory with this format first")
    sp.add_argument("--prompt", "-p", default="The three primary colors are", help="the text to continue")
    sp.add_argument("--n-predict", "-n", type=int, default=128, metavar="N", help="new tokens at most")
    sp.add_argument("--chat", action="store_true", help="send the prompt through the model's chat template")
    sp.add_argument("--temperature", type=float, default=0.0, help="0: greedy; more: sampled")
    sp.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's probability mass")
    sp.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    sp.add_argument("--engine", choices=("torch", "llama.cpp"), default="torch",
                    help="lowbit's PyTorch runtime, or llama.cpp (GGUF files)")
    sp.add_argument("--backend", default=None, metavar="NAME",
                    help="kernels for the quantized layers: 'exact' (the fastest whose product is exact up to float32 "
                         "rounding), 'fast' (also those that round the input to int8 or bfloat16), or a backend's name (`lowbit "
                         "formats` lists them); default exact")
    sp.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the torch engine)")
    sp.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: PyTorch's / all cores)")
    sp.add_argument("--json", metavar="FILE", help="also write the timings and the text to this JSON file")
    _common(sp, force=False)

    sp = cmd("import", "a GGUF file as a Hugging Face model directory (weights dequantized)", cmd_import)
    sp.add_argument("model", metavar="MODEL", help="a .gguf file or 'smollm2'")
    sp.add_argument("--out", "-o", required=True, metavar="DIR", help="output directory")
    sp.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16", help="weights' type")
    _common(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # quantize's OUT and TYPE words among its options; anything else is refused
        if getattr(args, "cmd", None) == "quantize" and not any(e.startswith("-") for e in extra):
            args.rest = [*(args.rest or []), *extra]
        else:
            bad = [e for e in extra if e.startswith("-")] or extra
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
    from lowbit.model.load import silence_libraries

    silence_libraries(import_transformers=False, environment=True)  # the rest when transformers is imported
    try:
        return int(args.func(args))
    except LowbitError as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a disk that fills up, a file that vanishes during the work
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"lowbit: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
