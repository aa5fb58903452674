"""The ``lowbit`` command: quantize, imatrix, eval, compare, formats."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lowbit.errors import LowbitError

DEFAULT_FORMATS = (
    "fp16,bf16,fp8-e4m3,fp8-e5m2,q8_0,int8,q5_1,q5_0,q4_1,q4_0,nf4,nf4-dq,fp4,"
    "int4-g128,int4-asym-g128,int4-asym-g128-clip,int3-asym-g64-clip,int2-asym-g32-clip"
)


#: --out-format: the module and function writing each export directory
EXPORTS = {
    "compressed-tensors": ("lowbit.io.export_ct", "export_compressed_tensors"),
    "bitsandbytes": ("lowbit.io.export_bnb", "export_bitsandbytes"),
    "gptq": ("lowbit.io.export_gptq", "export_gptq"),
    "awq": ("lowbit.io.export_awq", "export_awq"),
}


def _alpha(value: str) -> float | None:
    from lowbit.eval.compare import parse_alpha

    try:
        return parse_alpha(value)
    except LowbitError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _text(args: argparse.Namespace) -> tuple[str | None, str]:
    if args.text:
        from lowbit.eval.data import read_text_file

        return read_text_file(args.text), Path(args.text).name
    return None, "wiki-eval (gensim's Wikipedia articles, evaluation split)"


def cmd_formats(args: argparse.Namespace) -> int:
    from lowbit.formats import get_format, list_formats

    shape = (4096, 4096)
    print(f"{'format':<40} {'bpw (4096x4096)':>16}  description")
    for name in list_formats():
        if "<" in name:
            print(f"{name:<40} {'':>16}  integer family, e.g. int4-g128, int3-asym-g64-clip")
            continue
        f = get_format(name)
        gguf = " [GGUF]" if f.gguf_type is not None else ""
        print(f"{name:<40} {f.bits_per_weight(shape):>16.4f}  {f.description}{gguf}")
    return 0


def _method_scheme(args: argparse.Namespace) -> str:
    """The format a quantize command asks for: ``--format``, or one built from --bits/--group-size."""
    if args.format:
        if args.bits is not None:
            raise LowbitError("give either --format or --bits/--group-size, not both")
        return str(args.format)
    if args.bits is None:
        raise LowbitError("give --format (e.g. q4_k_m, int4-asym-g128) or --bits and --group-size")
    g = args.group_size
    if args.method == "spqr":
        return f"spqr{args.bits}-g{16 if g is None else g}"
    g = 128 if g is None else g
    gran = "-ch" if g in (0, -1) else f"-g{g}"
    return f"int{args.bits}{'' if args.sym else '-asym'}{gran}"


def _calib_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from lowbit.algorithms.gptq import GPTQConfig
    from lowbit.model.calibrate import CalibConfig
    from lowbit.model.qat import QATConfig

    return CalibConfig(method=args.method, n_samples=args.calib_samples, seq_len=args.calib_len,
                       gptq=GPTQConfig(damp=args.damp, act_order=args.act_order),
                       spqr_outliers=args.outliers, smooth_alpha=args.alpha,
                       qat=QATConfig(steps=args.qat_steps, lr=args.qat_lr, batch_size=args.qat_batch))


def _calibration_text(args: argparse.Namespace) -> str:
    if args.calib_text:
        from lowbit.eval.data import read_text_file

        return read_text_file(args.calib_text)
    from lowbit.eval.data import calibration_text

    return calibration_text()


def _calibration_chunks(args: argparse.Namespace, loaded, cfg):  # type: ignore[no-untyped-def]
    from lowbit.model.imatrix import imatrix_chunks

    return imatrix_chunks(loaded, _calibration_text(args), n_ctx=cfg.seq_len, max_chunks=cfg.n_samples)


def _parse_size(text: str) -> int:
    """'1.2GB', '800MB', '500000000' -> bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*", text.lower())
    if not m:
        raise LowbitError(f"--target-size {text!r}: give a size such as 1.2GB, 800MB or 90MiB")
    unit = (m.group(2) or "b").rstrip("b") or ""
    mult = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    return int(float(m.group(1)) * mult[unit])


def cmd_quantize_budget(args: argparse.Namespace) -> int:
    """--target-bpw / --target-size: measure sensitivities, search the mix, write the file: a GGUF
    file of llama.cpp types, or a lowbit checkpoint directory of any of lowbit's formats."""

    from lowbit.eval import mixsearch as ms
    from lowbit.model.load import load_model, resolve_model_path

    if args.method != "rtn" or args.format or args.bits is not None:
        raise LowbitError("--target-bpw/--target-size choose the format of every tensor themselves; "
                          "drop --format, --bits and --method")
    if args.target_bpw is not None and args.target_size is not None:
        raise LowbitError("give --target-bpw or --target-size, not both")
    if args.out_format != "lowbit":
        raise LowbitError(f"--out-format {args.out_format} takes one format for every layer; the budget search writes "
                          "a .gguf file or a lowbit checkpoint directory")
    out = Path(args.out)
    target = "gguf" if out.suffix.lower() == ".gguf" else "lowbit"
    if out.exists() and not args.force:
        raise LowbitError(f"{out}: already exists (use --force to overwrite)")
    if args.target_bpw is not None and not 1.0 < args.target_bpw <= 32.0:
        raise LowbitError(f"--target-bpw {args.target_bpw}: give bits per weight between 1 and 32")
    target_bytes = _parse_size(args.target_size) if args.target_size is not None else None
    excluded = {t.strip().lower() for t in (args.exclude_types or "").split(",") if t.strip()}
    pool = tuple(t.strip().lower() for t in args.types.split(",") if t.strip()) if args.types else ms.default_types(target)
    allowed = ms.check_types(tuple(t for t in pool if t not in excluded), target)
    src = resolve_model_path(args.model)
    loaded = load_model(src, progress=not args.quiet)
    from lowbit.eval.data import calibration_text, read_text_file
    from lowbit.model.imatrix import imatrix_chunks

    text = read_text_file(args.calib_text) if args.calib_text else calibration_text()
    if args.imatrix:
        from lowbit.io.imatrix import read_imatrix

        imatrix = read_imatrix(Path(args.imatrix)).values()
    else:
        from lowbit.model.imatrix import compute_imatrix

        imatrix = compute_imatrix(loaded, text, n_ctx=args.calib_len, max_chunks=args.calib_samples,
                                  progress=not args.quiet).values()
    chunks = imatrix_chunks(loaded, text, n_ctx=args.calib_len, max_chunks=args.sens_chunks)
    sens = ms.measure(loaded, chunks, imatrix, allowed=allowed, progress=not args.quiet, target=target)
    budget = sens.budget_for_bpw(args.target_bpw) if target_bytes is None else 8 * target_bytes
    mix, sol = ms.search(sens, budget)
    measured = ms.validate(loaded, sens, {"searched": mix}, chunks, imatrix)["searched"][1]  # on a copy
    if out.exists():
        if out.is_dir():
            import shutil

            shutil.rmtree(out)
        else:
            out.unlink()
    if target == "gguf":
        from lowbit.io.hf_gguf import write_gguf_from_hf

        report = write_gguf_from_hf(loaded, out, "q4_k_m", progress=not args.quiet, imatrix=imatrix, types=dict(mix))
        size = None
    else:
        from lowbit.model.checkpoint import save_checkpoint

        report = ms.apply_mix(loaded, mix, imatrix, progress=not args.quiet, target=target)
        save_checkpoint(loaded, out, "mix", "rtn", extra={"mix": dict(mix), "predicted_kld": sol.loss,
                                                         "calibration_kld": measured, "budget_bits": budget})
        size = sum(f.stat().st_size for f in out.iterdir())
    print(f"sensitivities of {len(sens.tensors)} tensors on {sens.tokens} calibration tokens in {sens.seconds:.0f} s")
    print(f"budget {budget / 8e6:.2f} MB ({budget / sens.n_params:.3f} bits/weight): chose {sol.bits / 8e6:.2f} MB "
          f"({sol.bits / sens.n_params:.3f} bits/weight); predicted KLD {sol.loss:.5f}, measured {measured:.5f} "
          f"on the calibration chunks")
    _print_wrote(out, report, size)
    return 0


def _auto_device(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def _can_stream(src: Path) -> bool:
    from lowbit.io.hf_stream import can_stream

    return can_stream(src)


def cmd_quantize(args: argparse.Namespace) -> int:
    from lowbit.model.actquant import parse_act_scheme
    from lowbit.model.gguf_mix import FILE_TYPES, file_type
    from lowbit.model.load import resolve_model_path
    from lowbit.model.policy import check_scheme

    if args.target_bpw is not None or args.target_size is not None:
        return cmd_quantize_budget(args)
    scheme = _method_scheme(args)
    act = parse_act_scheme(scheme)
    if act is None:
        check_scheme(scheme)
        if args.method == "smoothquant":
            raise LowbitError("--method smoothquant smooths activations: give an activation scheme "
                              "(--format w8a8, w8a8-static-mse, w4a4 ...)")
    elif args.method not in ("rtn", "smoothquant", "qat"):
        raise LowbitError(f"{scheme} quantizes activations: its methods are rtn, smoothquant and qat, not {args.method}")
    ft = file_type(scheme) if act is None else None
    src = resolve_model_path(args.model)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise LowbitError(f"{out}: already exists (use --force to overwrite)")
    to_gguf = out.suffix.lower() == ".gguf"
    if args.out_format != "lowbit" and (to_gguf or act is not None or args.method == "quip"):
        raise LowbitError(f"--out-format {args.out_format} writes a directory of a weight-only model "
                          "(not a .gguf, not activation schemes, not QuIP's rotated layers)")
    if to_gguf and act is not None:
        raise LowbitError(f"{scheme} quantizes activations, which GGUF files cannot describe; give an --out "
                          "directory for a lowbit checkpoint")
    if to_gguf and ft is None:
        raise LowbitError(f"format {scheme} has no GGUF type; GGUF output takes {', '.join(sorted(FILE_TYPES))} "
                          "(write a lowbit checkpoint directory instead: an --out without .gguf)")
    if to_gguf and args.method == "quip":
        raise LowbitError("QuIP's rotated layers cannot go into a GGUF file (llama.cpp does not rotate their "
                          "inputs); give an --out directory for a lowbit checkpoint")
    imatrix = None
    if getattr(args, "imatrix", None):
        if args.method != "rtn":
            raise LowbitError(f"--imatrix is for round-to-nearest; {args.method} uses the calibration Hessian")
        from lowbit.io.imatrix import read_imatrix

        imatrix = read_imatrix(Path(args.imatrix)).values()
    device = getattr(args, "device", "cpu")
    streamed_rtn = to_gguf and args.method == "rtn" and (src.is_file() or _can_stream(src))
    streamed_calib = to_gguf and args.method in ("gptq", "awq") and _can_stream(src)
    if device != "cpu" and not streamed_rtn and not (streamed_calib and device != "auto"):
        raise LowbitError("--device is for GGUF output from a .gguf file or a safetensors directory (round-to-"
                          "nearest; GPTQ and AWQ from a safetensors directory take one device, not auto)")
    if to_gguf and args.method == "rtn":
        if src.is_file():
            from lowbit.io.gguf_out import write_gguf

            report = write_gguf(src, out, ft.name, progress=not args.quiet, imatrix=imatrix, resume=True,
                                device=_auto_device(device))
        elif _can_stream(src):  # tensor by tensor from the safetensors files, resumable
            from lowbit.io.hf_stream import write_gguf_streaming
            from lowbit.model.devices import plan_devices

            notes: list[str] = []
            dmap = plan_devices(src) if device == "auto" else None
            report = write_gguf_streaming(src, out, ft.name, progress=not args.quiet, imatrix=imatrix, notes=notes,
                                          device=device, device_map=dmap)
            for n in notes:
                print(f"note: {n}")
        else:
            from lowbit.io.hf_gguf import write_gguf_from_hf
            from lowbit.model.load import load_model

            loaded = load_model(src, progress=not args.quiet)
            report = write_gguf_from_hf(loaded, out, ft.name, progress=not args.quiet, imatrix=imatrix)
            for n in loaded.notes:
                print(f"note: {n}")
        _print_wrote(out, report)
        return 0

    cfg = _calib_config(args)
    if streamed_calib:
        cfg.device = device
        # one decoder layer in memory at a time, resumable
        from lowbit.io.hf_stream import write_gguf_calibrated_streaming

        notes = []
        report, logs = write_gguf_calibrated_streaming(src, out, ft.name, cfg, _calibration_text(args),
                                                       progress=not args.quiet, notes=notes)
        for n in notes:
            print(f"note: {n}")
        _print_gain(args.method, cfg, logs)
        _print_wrote(out, report)
        return 0

    import shutil

    from lowbit.model.calibrate import calibrate_quantize
    from lowbit.model.load import load_model

    loaded = load_model(src, progress=not args.quiet)
    if args.method == "qat":
        import copy

        from lowbit.model.qat import qat_quantize

        chunks = _calibration_chunks(args, loaded, cfg)
        teacher = copy.deepcopy(loaded.model)
        report, res = qat_quantize(loaded.model, teacher, scheme, chunks, cfg.qat, progress=not args.quiet)
        del teacher
        print(f"qat: {len(res.losses)} steps of {cfg.qat.batch_size} x {cfg.seq_len} tokens in {res.seconds:.0f} s; "
              f"distillation loss {res.losses[0]:.4f} -> {sum(res.losses[-10:]) / len(res.losses[-10:]):.4f} "
              "(mean of the last 10 steps)")
    elif act is not None:
        from lowbit.model.actquant import ActConfig, quantize_act_model

        chunks = _calibration_chunks(args, loaded, cfg) if (act.static or args.method == "smoothquant") else None
        report = quantize_act_model(loaded.model, act, chunks, ActConfig(args.method == "smoothquant", args.alpha),
                                    progress=not args.quiet)
        if "smoothing" in report.details:
            from lowbit.model.actquant import describe_smoothing

            print(describe_smoothing(report.details["smoothing"]))  # type: ignore[arg-type]
    elif args.method == "rtn":
        from lowbit.model.quantize import quantize_model

        report = quantize_model(loaded.model, scheme, progress=not args.quiet, imatrix=imatrix)
    else:
        chunks = _calibration_chunks(args, loaded, cfg)
        report, logs = calibrate_quantize(loaded, scheme, chunks, cfg, progress=not args.quiet)
        _print_gain(args.method, cfg, logs, len(chunks))
    if out.exists() and args.force:
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    if to_gguf:
        from lowbit.io.hf_gguf import write_gguf_from_hf

        write_gguf_from_hf(loaded, out, ft.name, progress=not args.quiet)
        size = out.stat().st_size
    elif args.out_format in EXPORTS:
        import importlib

        module, fn = EXPORTS[args.out_format]
        getattr(importlib.import_module(module), fn)(loaded, out)
        size = sum(f.stat().st_size for f in out.iterdir())
    else:
        from lowbit.model.checkpoint import save_checkpoint

        save_checkpoint(loaded, out, scheme, args.method)
        size = sum(f.stat().st_size for f in out.iterdir())
    _print_wrote(out, report, size)
    return 0


def _print_wrote(out: Path, report, size: int | None = None) -> None:  # type: ignore[no-untyped-def]
    """The last line of a quantization: the output, its size (the file's unless given), bits per
    weight and how many tensors went into each type."""
    counts = ", ".join(f"{k} {v}" for k, v in sorted(report.counts().items()))
    size = out.stat().st_size if size is None else size
    print(f"wrote {out}: {size / 1e6:.1f} MB, {report.bits_per_weight:.3f} bits/weight ({counts})")


def _print_gain(method: str, cfg, logs: list, n_chunks: int | None = None) -> None:  # type: ignore[no-untyped-def]
    """One line: the calibrated layers' output error as a share of round-to-nearest's."""
    rtn = sum(lg.rtn_error for lg in logs if lg.rtn_error > 0)
    if not logs or rtn <= 0:
        return
    gain = sum(lg.error for lg in logs if lg.rtn_error > 0) / rtn
    chunks = f"{n_chunks} x {cfg.seq_len}" if n_chunks is not None else f"up to {cfg.n_samples} x {cfg.seq_len}"
    print(f"{method}: {chunks} calibration tokens; layer output error {100 * gain:.1f}% of round-to-nearest's "
          "(summed over layers)")


def cmd_import(args: argparse.Namespace) -> int:
    from lowbit.io.hf_import import import_gguf

    out = Path(args.out)
    if out.exists() and not args.force:
        raise LowbitError(f"{out}: already exists (use --force to overwrite)")
    if out.exists():
        import shutil

        shutil.rmtree(out) if out.is_dir() else out.unlink()
    import_gguf(args.model, out, args.dtype, progress=not args.quiet)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out}: a Hugging Face model directory, {size / 1e6:.1f} MB ({args.dtype})")
    return 0


def cmd_imatrix(args: argparse.Namespace) -> int:
    from lowbit.io.imatrix import write_imatrix
    from lowbit.model.imatrix import compute_imatrix
    from lowbit.model.load import load_model

    out = Path(args.out)
    if out.exists() and not args.force:
        raise LowbitError(f"{out}: already exists (use --force to overwrite)")
    if args.text:
        from lowbit.eval.data import read_text_file

        text, name = read_text_file(args.text), Path(args.text).name
    else:
        from lowbit.eval.data import calibration_text

        text, name = calibration_text(), "wiki-calib (gensim's Wikipedia articles, calibration split)"
    loaded = load_model(args.model, progress=not args.quiet)
    im = compute_imatrix(loaded, text, n_ctx=args.ctx, max_chunks=args.chunks, dataset=name, progress=not args.quiet)
    write_imatrix(im, out, legacy=None if args.output_format is None else args.output_format == "dat")
    tokens = int(max(e.counts.max() for e in im.entries.values()))
    print(f"wrote {out}: {len(im.entries)} tensors, {im.chunk_count} chunks of {im.chunk_size} tokens "
          f"({tokens} tokens) of {name}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lowbit.eval.runner import Evaluation, torch_logits_fn
    from lowbit.model.load import load_model, resolve_model_path
    from lowbit.model.quantize import quantize_model

    text, text_name = _text(args)
    if text is None:
        from lowbit.eval.data import eval_text

        text = eval_text()
    path = resolve_model_path(args.model)
    if args.engine == "llama.cpp" and not path.is_file():
        raise LowbitError(f"{path}: --engine llama.cpp evaluates a GGUF file")
    ref = load_model(args.reference or args.model, progress=not args.quiet)
    ev = Evaluation(ref, text, n_ctx=args.ctx, max_chunks=args.chunks, progress=not args.quiet)
    label = args.format or path.name
    size: float | None = float(path.stat().st_size) if path.is_file() and not args.format else None
    bpw: float | None = None
    try:
        base = ev.run(torch_logits_fn(ref.model, args.ctx), "original", as_reference=True)
        if args.engine == "llama.cpp":
            from lowbit.eval.llamacpp import LlamaCppModel

            res = ev.run(LlamaCppModel(path, n_ctx=args.ctx).logits_fn(), f"{label} (llama.cpp)")
        else:
            model = load_model(args.model, progress=not args.quiet).model if args.reference else ref.model
            if args.format:
                report = quantize_model(model, args.format, progress=not args.quiet)
                size, bpw = float(report.size_bytes), report.bits_per_weight
            res = ev.run(torch_logits_fn(model, args.ctx), label)
    finally:
        ev.close()
    print(f"text: {text_name}, {int(res['tokens'])} scored tokens in {int(res['chunks'])} chunks of {args.ctx}")
    print(f"original PPL {base['ppl']:.4f} ± {base['ppl_err']:.4f}")
    line = f"{label}: PPL {res['ppl']:.4f} ± {res['ppl_err']:.4f}"
    if "kld_mean" in res:
        line += f", KLD mean {res['kld_mean']:.6f}, p99 {res['kld_p99']:.5f}, same top token {100 * res['same_top']:.2f}%"
    if bpw is not None:
        line += f", {bpw:.3f} bits/weight"
    if size is not None:
        line += f", {size / 1e6:.1f} MB"
    print(line)
    if args.json:
        doc = {"original": base, "result": res, "bits_per_weight": bpw, "size_bytes": size}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from lowbit.algorithms.gptq import GPTQConfig
    from lowbit.eval.compare import compare, default_out_dir, parse_spec
    from lowbit.eval.report import markdown_table, plot, summary, write_json
    from lowbit.io.imatrix import read_imatrix
    from lowbit.model.calibrate import CalibConfig
    from lowbit.model.load import load_model

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    for f in formats:
        parse_spec(f)
    imatrix = read_imatrix(args.imatrix).values() if args.imatrix else None
    text, text_name = _text(args)
    calib_text = None
    if args.calib_text:
        from lowbit.eval.data import read_text_file

        calib_text = read_text_file(args.calib_text)
    loaded = load_model(args.model, progress=not args.quiet)
    from lowbit.model.qat import QATConfig

    calib = CalibConfig(n_samples=args.calib_samples, seq_len=args.calib_len, gptq=GPTQConfig(damp=args.damp),
                        smooth_alpha=args.alpha,
                        qat=QATConfig(steps=args.qat_steps, lr=args.qat_lr, batch_size=args.qat_batch))
    cmp = compare(loaded, formats, text=text, text_name=text_name, n_ctx=args.ctx,
                  max_chunks=args.chunks, progress=not args.quiet, imatrix=imatrix, calib=calib,
                  calib_text=calib_text)
    out_dir = Path(args.out_dir) if args.out_dir else default_out_dir(loaded.name)
    print(summary(cmp))
    for n in cmp.notes:
        print(f"note: {n}")
    print(markdown_table(cmp, times=True))
    write_json(cmp, out_dir / "compare.json")
    plot(cmp, out_dir / "compare.png")
    (out_dir / "compare.md").write_text(summary(cmp) + "\n\n" + markdown_table(cmp, times=True) + "\n")
    print(f"wrote {out_dir / 'compare.md'}, {out_dir / 'compare.json'}, {out_dir / 'compare.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="Quantize LLMs and measure what each format costs.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common_eval(sp: argparse.ArgumentParser, chunks: int | None) -> None:
        sp.add_argument("--text", help="UTF-8 text file to evaluate on (default: the bundled Wikipedia split)")
        sp.add_argument("--ctx", type=int, default=512, help="context length per chunk (default 512)")
        sp.add_argument("--chunks", type=int, default=chunks, help="evaluate only the first N chunks")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")

    sp = sub.add_parser("import", help="a GGUF file as a Hugging Face model directory (weights dequantized)")
    sp.add_argument("model", help="a .gguf file or 'smollm2'")
    sp.add_argument("--out", "-o", required=True, help="output directory")
    sp.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    sp.add_argument("--force", action="store_true", help="overwrite an existing output")
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=cmd_import)

    sp = sub.add_parser("formats", help="list the formats and their bits per weight")
    sp.set_defaults(func=cmd_formats)

    sp = sub.add_parser("quantize", help="quantize a model: a GGUF file, or a lowbit checkpoint directory")
    sp.add_argument("model", help="a .gguf file, a Hugging Face directory, or 'smollm2'")
    sp.add_argument("--format", "-f",
                    help="llama.cpp file type (q4_k_m, q3_k_s, iq4_xs, ...) or lowbit format (int4-asym-g128, nf4, e8p, ...)")
    sp.add_argument("--method", "-m", default="rtn",
                    choices=("rtn", "gptq", "awq", "quip", "spqr", "smoothquant", "qat"),
                    help="how codes are chosen: round-to-nearest, a calibration method, SmoothQuant (with an "
                         "activation scheme such as w8a8) or quantization-aware training (default rtn)")
    sp.add_argument("--bits", type=int, help="with --method: integer bits (builds int<bits>[-asym]-g<group>, or spqr<bits>)")
    sp.add_argument("--group-size", type=int, default=None,
                    help="with --bits: columns per scale (default 128; SpQR 16; 0: per channel)")
    sp.add_argument("--sym", action="store_true", help="with --bits: symmetric (absmax) instead of zero-point")
    sp.add_argument("--no-act-order", dest="act_order", action="store_false",
                    help="GPTQ/QuIP: quantize columns left to right instead of by decreasing importance")
    sp.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, as a fraction of the mean Hessian diagonal")
    sp.add_argument("--outliers", type=float, default=0.01, help="SpQR: fraction of weights kept as FP16 outliers")
    sp.add_argument("--alpha", type=_alpha, default=0.5,
                    help="SmoothQuant's migration strength in [0, 1] (default 0.5), or 'auto': searched per group of "
                         "layers by the error of their quantized outputs on the calibration text")
    sp.add_argument("--out-format", choices=("lowbit", *EXPORTS),
                    default="lowbit",
                    help="for a directory --out: lowbit's checkpoint; compressed-tensors' pack-quantized layout "
                         "(transformers and vLLM load it; 4/8-bit integer formats whose groups divide every row); "
                         "bitsandbytes' 4-bit serialization (nf4, nf4-dq, fp4, fp4-dq); the GPTQ checkpoint "
                         "layout (2/3/4/8-bit integer formats per channel or with groups that divide every row); or "
                         "AWQ's GEMM layout (4-bit zero-point formats whose groups divide every row)")
    sp.add_argument("--target-bpw", type=float, help="choose every tensor's format to fit this many bits per weight "
                                                     "with the least predicted KL divergence: llama.cpp types for a "
                                                     ".gguf --out, any lowbit format for a checkpoint directory")
    sp.add_argument("--target-size", help="the same for a file size, e.g. 90MB or 1.2GB")
    sp.add_argument("--sens-chunks", type=int, default=8,
                    help="with a target: calibration chunks for the per-tensor sensitivities (default 8)")
    sp.add_argument("--types", help="with a target: the candidate formats, comma-separated (default: every llama.cpp "
                                    "type lowbit writes for a .gguf; for a checkpoint int2..int8 per group or channel, "
                                    "nf4, nf4-dq, fp8-e4m3-ch, fp16)")
    sp.add_argument("--exclude-types", help="with a target: formats the search must not use (e.g. q4_1, the type a "
                                            "model was distributed in, which reproduces it for free)")
    sp.add_argument("--qat-steps", type=int, default=100, help="QAT: optimizer steps (default 100)")
    sp.add_argument("--qat-lr", type=float, default=5e-5, help="QAT: peak learning rate (default 5e-5)")
    sp.add_argument("--qat-batch", type=int, default=2, help="QAT: calibration chunks per step (default 2)")
    sp.add_argument("--calib-text", help="calibration text file (default: the bundled Wikipedia calibration split)")
    sp.add_argument("--calib-samples", type=int, default=128, help="calibration chunks (default 128)")
    sp.add_argument("--calib-len", type=int, default=512, help="tokens per calibration chunk (default 512)")
    sp.add_argument("--out", "-o", required=True,
                    help="output: a .gguf file (llama.cpp types), or a directory (lowbit checkpoint, any format)")
    sp.add_argument("--imatrix", help="importance matrix file (llama.cpp's GGUF or legacy .dat format, or lowbit's)")
    sp.add_argument("--device", default="cpu",
                    help="round-to-nearest GGUF output: where the quantizers run (cpu, cuda, cuda:N), or 'auto': each "
                         "layer's tensors on the GPU accelerate's device map gives that layer (cpu without GPUs)")
    sp.add_argument("--force", action="store_true", help="overwrite an existing output")
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=cmd_quantize)

    sp = sub.add_parser("imatrix", help="compute an importance matrix from calibration text (llama-imatrix's file)")
    sp.add_argument("model", help="a .gguf file, a Hugging Face directory, or 'smollm2'")
    sp.add_argument("--out", "-o", required=True, help="output file: .gguf (llama.cpp's format) or .dat (legacy)")
    sp.add_argument("--text", help="UTF-8 calibration text (default: the bundled Wikipedia calibration split)")
    sp.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512, as llama-imatrix)")
    sp.add_argument("--chunks", type=int, default=None, help="use only the first N chunks")
    sp.add_argument("--output-format", choices=("gguf", "dat"), default=None,
                    help="file format (default: from the file name; GGUF unless it ends in .dat)")
    sp.add_argument("--force", action="store_true", help="overwrite an existing output file")
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=cmd_imatrix)

    sp = sub.add_parser("eval", help="perplexity, and KLD / same-top-token against the original")
    sp.add_argument("model", help="model to evaluate (a .gguf file, a directory, or 'smollm2')")
    sp.add_argument("--format", "-f", help="quantize the model in memory with this format first")
    sp.add_argument("--reference", help="original model to compare with (default: MODEL itself)")
    sp.add_argument("--engine", choices=("torch", "llama.cpp"), default="torch",
                    help="run MODEL with lowbit's PyTorch path or with llama.cpp (GGUF only)")
    sp.add_argument("--json", help="also write the results to this JSON file")
    common_eval(sp, None)
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("compare", help="quantize into several formats and tabulate the loss of each")
    sp.add_argument("model", nargs="?", default="smollm2", help="model (default: the bundled SmolLM2-135M)")
    sp.add_argument("--formats", default=DEFAULT_FORMATS,
                    help="comma-separated formats or llama.cpp file types (q4_k_m, ...); a '+imatrix' suffix "
                         "quantizes with the importance matrix, '+gptq', '+awq', '+quip', '+spqr' with a "
                         "calibration method (e.g. int4-asym-g128+gptq, q3_k_m+gptq, spqr3-g16+spqr); activation "
                         "schemes w8a8, w4a4, w8a8-static[-pct|-mse], w8a8-fp8, llm-int8, with '+smoothquant'; "
                         "'+qat' fine-tunes any of them through fake quantization")
    sp.add_argument("--imatrix", help="importance matrix file for the '+imatrix' entries "
                                      "(default: computed from the bundled calibration text)")
    sp.add_argument("--calib-text", help="calibration text for '+gptq' etc. (default: the bundled calibration split)")
    sp.add_argument("--calib-samples", type=int, default=128, help="calibration chunks for methods (default 128)")
    sp.add_argument("--calib-len", type=int, default=512, help="tokens per calibration chunk (default 512)")
    sp.add_argument("--damp", type=float, default=0.01, help="GPTQ/QuIP/SpQR damping (fraction of mean diag H)")
    sp.add_argument("--alpha", type=_alpha, default=0.5,
                    help="SmoothQuant's migration strength for '+smoothquant' (number or 'auto'; an entry may set its "
                         "own: 'w8a8+smoothquant=auto')")
    sp.add_argument("--qat-steps", type=int, default=100, help="QAT steps for '+qat' entries (default 100)")
    sp.add_argument("--qat-lr", type=float, default=5e-5, help="QAT peak learning rate (default 5e-5)")
    sp.add_argument("--qat-batch", type=int, default=2, help="QAT calibration chunks per step (default 2)")
    sp.add_argument("--out-dir", help="where compare.md/.json/.png go (default runs/<model>)")
    common_eval(sp, 20)
    sp.set_defaults(func=cmd_compare)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LowbitError as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
