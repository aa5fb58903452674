"""What a user can trust: lowbit never deletes or overwrites what it did not write, never hands back
random weights, and its outputs carry a complete config."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit.errors import LowbitError, ModelLoadError
from lowbit.io import outputs
from lowbit.model.quantize import quantize_model


def lowbit(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=900)


def _error(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lowbit: error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---- no data loss ---------------------------------------------------------------------------------
def test_force_never_deletes_a_directory_of_the_users(tmp_path):
    """The finding: `quantize ... -o mymodels --force` deleted the user's directory with their notes."""
    mine = tmp_path / "mymodels"
    mine.mkdir()
    (mine / "important-notes.txt").write_text("my notes")
    (mine / "other.gguf").write_bytes(b"GGUF not really")
    before = _tree(mine)
    for cmd in (["quantize", "smollm2", "-f", "q8_0", "--out-format", "lowbit", "-o", str(mine), "--force"],
                ["quantize", "smollm2", "-f", "nf4", "-o", str(mine), "--force"],
                ["import", "smollm2", "-o", str(mine), "--force"]):
        _error(lowbit(*cmd), str(mine), "not an output of lowbit's")
    assert _tree(mine) == before


def test_force_replaces_lowbits_own_directory_but_not_one_with_foreign_files(tmp_path):
    out = tmp_path / "ck"
    with outputs.writing_dir(out) as d:
        (d / "config.json").write_text("{}")
        (d / "sub").mkdir()
        (d / "sub" / "a.bin").write_bytes(b"a")
    marker = json.loads((out / outputs.MARKER).read_text())
    assert sorted(marker["files"]) == ["config.json", "sub/a.bin"] and marker["kind"] == outputs.MODEL_DIR
    with pytest.raises(LowbitError, match="already exists"):
        outputs.check_output(out, outputs.MODEL_DIR, force=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(LowbitError, match=r"holds files lowbit did not write \(notes.txt\)"):
        outputs.check_output(out, outputs.MODEL_DIR, force=True)
    with pytest.raises(LowbitError, match="notes.txt"):
        with outputs.writing_dir(out, force=True) as d:
            (d / "config.json").write_text("{}")
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "a.bin").read_bytes() == b"a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary directory left behind
    (out / "notes.txt").unlink()
    (out / "empty-dir-of-mine").mkdir()  # a directory of the user's, empty: also not lowbit's
    with pytest.raises(LowbitError, match="empty-dir-of-mine/"):
        outputs.check_output(out, outputs.MODEL_DIR, force=True)
    (out / "empty-dir-of-mine").rmdir()
    # a file rewritten since (save_pretrained into lowbit's directory, an edit) is no longer lowbit's
    saved = (out / "sub" / "a.bin").stat()
    (out / "sub" / "a.bin").write_bytes(b"b")
    with pytest.raises(LowbitError, match=r"sub/a.bin \(changed since lowbit wrote it\)"):
        outputs.check_output(out, outputs.MODEL_DIR, force=True)
    (out / "sub" / "a.bin").write_bytes(b"a")
    os.utime(out / "sub" / "a.bin", ns=(saved.st_atime_ns, saved.st_mtime_ns))
    with outputs.writing_dir(out, force=True) as d:
        (d / "model.safetensors").write_bytes(b"new")
    assert sorted(_tree(out)) == [outputs.MARKER, "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_a_gguf_another_tool_made_from_lowbits_is_not_lowbits(tmp_path):
    """llama-quantize copies every metadata key of its input, lowbit's marker too; the marker's digest
    does not fit the file it wrote, so lowbit does not take that file for its own."""
    import gguf

    from lowbit.eval.llamacpp import llama_quantize

    ours = tmp_path / "ours.gguf"
    r = lowbit("quantize", "smollm2", "-f", "q8_0", "-o", str(ours), "--quiet")
    assert r.returncode == 0, r.stderr
    assert outputs.output_kind(ours) == outputs.GGUF
    derived = tmp_path / "derived.gguf"
    llama_quantize(ours, derived, "q4_0")
    assert outputs.GGUF_KEY in gguf.GGUFReader(derived).fields  # copied over
    assert outputs.output_kind(derived) is None
    _error(lowbit("quantize", "smollm2", "-f", "q4_0", "-o", str(derived), "--force"), "not an output of lowbit's")


def test_a_failed_write_leaves_the_earlier_output_as_it_was(tmp_path):
    out = tmp_path / "ck"
    with outputs.writing_dir(out) as d:
        (d / "config.json").write_text("old")
    before = _tree(out)
    with pytest.raises(RuntimeError, match="boom"):
        with outputs.writing_dir(out, force=True) as d:
            (d / "config.json").write_text("new")
            raise RuntimeError("boom")
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_paths_of_the_wrong_kind_and_links_are_refused(tmp_path, smol_path):
    (tmp_path / "d.gguf").mkdir()
    _error(lowbit("quantize", "smollm2", "-f", "q8_0", "-o", str(tmp_path / "d.gguf"), "--force"),
           "d.gguf", "is a directory")
    user = tmp_path / "user.gguf"
    user.write_text("the user's")
    link = tmp_path / "link.gguf"
    link.symlink_to(user)
    _error(lowbit("quantize", "smollm2", "-f", "q8_0", "-o", str(link), "--force"), "link.gguf", "symbolic link")
    dangling = tmp_path / "dangling.gguf"
    dangling.symlink_to(tmp_path / "nowhere.gguf")
    _error(lowbit("quantize", "smollm2", "-f", "q8_0", "-o", str(dangling)), "dangling.gguf", "symbolic link")
    dlink = tmp_path / "dirlink"
    dlink.symlink_to(tmp_path / "d.gguf")
    _error(lowbit("import", "smollm2", "-o", str(dlink), "--force"), "dirlink", "symbolic link")
    _error(lowbit("quantize", "smollm2", "-f", "q8_0", "-o", str(user), "--force"), "not an output of lowbit's")
    assert user.read_text() == "the user's" and not (tmp_path / "nowhere.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.gguf", "dangling.gguf", "dirlink", "link.gguf", "user.gguf"]


def test_gguf_outputs_are_replaced_only_when_lowbit_wrote_them(tmp_path):
    out = tmp_path / "m.gguf"
    r = lowbit("quantize", "smollm2", "-f", "q8_0", "-o", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert outputs.output_kind(out) == outputs.GGUF
    _error(lowbit("quantize", "smollm2", "-f", "q8_0", "-o", str(out)), "already exists", "--force replaces it")
    r = lowbit("quantize", "smollm2", "-f", "q4_0", "-o", str(out), "--quiet", "--force")
    assert r.returncode == 0, r.stderr
    # an importance matrix is another kind of output: --force does not put one where a model was
    _error(lowbit("imatrix", "smollm2", "-o", str(out), "--force", "--calib-chunks", "1"),
           "is lowbit's GGUF model file, not an importance matrix")
    assert outputs.output_kind(out) == outputs.GGUF
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_report_files_of_the_users_are_not_overwritten(tmp_path):
    from lowbit.eval.report import write_report_json

    mine = tmp_path / "results.json"
    mine.write_text('{"mine": 1}')
    with pytest.raises(LowbitError, match="not an output of lowbit's"):
        write_report_json(mine, {"x": 1})
    assert mine.read_text() == '{"mine": 1}'
    ours = tmp_path / "ours.json"
    write_report_json(ours, {"x": 1})
    write_report_json(ours, {"x": 2})  # lowbit's own report: every run rewrites it
    assert json.loads(ours.read_text())["x"] == 2
    _error(lowbit("eval", "smollm2", "--json", str(mine), "--chunks", "1"), "results.json", "not an output of lowbit's")


def test_unwritable_output_is_refused_before_the_work(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere the file system lets it: use a read-only file system
        target = Path("/proc/lowbit-test-out.gguf")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        target = ro / "x.gguf"
    import time

    t0 = time.monotonic()
    _error(lowbit("quantize", "smollm2", "-f", "q8_0", "-o", str(target)), str(target), "cannot write")
    assert time.monotonic() - t0 < 5


def test_markers_are_recognized(tmp_path, ggml):
    from lowbit.io.imatrix import read_imatrix, write_imatrix
    from lowbit.model.imatrix_collect import Imatrix, ImatrixEntry

    im = Imatrix()
    im.entries["blk.0.attn_q.weight"] = ImatrixEntry(torch.rand(1, 64).numpy(), torch.tensor([4.0]).numpy())
    im.chunk_count, im.chunk_size = 1, 64
    for name in ("a.gguf", "a.dat"):
        write_imatrix(im, tmp_path / name)
        assert outputs.output_kind(tmp_path / name) == outputs.IMATRIX
        back = read_imatrix(tmp_path / name)
        assert set(back.entries) == set(im.entries)
        with pytest.raises(LowbitError, match="already exists"):
            write_imatrix(im, tmp_path / name)
        write_imatrix(im, tmp_path / name, force=True)
    (tmp_path / "plain.dat").write_bytes((tmp_path / "a.dat").read_bytes()[: -len(outputs.DAT_TRAILER)])
    assert outputs.output_kind(tmp_path / "plain.dat") is None  # llama-imatrix's own: not lowbit's to replace


# ---- no silent random weights ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def nf4_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "smol-nf4"
    r = lowbit("quantize", "smollm2", "-f", "nf4", "-o", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    return out


def test_plain_transformers_refuses_a_lowbit_checkpoint(nf4_checkpoint):
    """The finding: plain from_pretrained loaded lowbit's nf4 checkpoint with every linear weight random."""
    cfg = json.loads((nf4_checkpoint / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "lowbit"
    code = ("import sys, transformers\n"
            "from transformers import AutoModelForCausalLM, LlamaForCausalLM\n"
            "for cls in (AutoModelForCausalLM, LlamaForCausalLM):\n"
            "    try:\n"
            "        cls.from_pretrained(sys.argv[1])\n"
            "        print('loaded')\n"
            "    except Exception as e:\n"
            "        print('refused', type(e).__name__)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_")}  # transformers as it comes
    r = subprocess.run([sys.executable, "-c", code, str(nf4_checkpoint)], capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.stdout.split() == ["refused", "RuntimeError", "refused", "RuntimeError"], (r.stdout, r.stderr[-2000:])
    assert "got lowbit" in r.stderr  # transformers names the quantization method it does not know
    # lowbit itself loads it, and eval runs on it
    from lowbit.model.load import load_model

    back = load_model(nf4_checkpoint, progress=False)
    assert back.notes == ["lowbit checkpoint: nf4 by rtn"]


def test_load_model_refuses_weights_that_do_not_cover_the_model(small, tmp_path):
    """The finding: a model saved with save_pretrained after quantize_model evaluated to PPL 4e17."""
    from safetensors.torch import load_file, save_file

    from lowbit.model.load import load_model

    plain = tmp_path / "plain"
    small.model.save_pretrained(plain)
    small.tokenizer.save_pretrained(plain)
    assert load_model(plain, progress=False).n_params == small.n_params
    m = copy.deepcopy(small.model)
    quantize_model(m, "int4-g128", progress=False)
    m.save_pretrained(tmp_path / "api-saved")
    small.tokenizer.save_pretrained(tmp_path / "api-saved")
    with pytest.raises(ModelLoadError, match="saved with save_pretrained.*lowbit.save"):
        load_model(tmp_path / "api-saved", progress=False)
    _error(lowbit("eval", str(tmp_path / "api-saved"), "--chunks", "1", "--quiet"), "api-saved", "lowbit.save")
    # any directory whose files lack some of the model's weights: refused, naming them
    st = load_file(plain / "model.safetensors")
    del st["model.layers.1.mlp.up_proj.weight"]
    st["extra.tensor"] = torch.zeros(2)
    save_file(st, str(plain / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"1 weights are missing \(model.layers.1.mlp.up_proj.weight\).*extra.tensor"):
        load_model(plain, progress=False)


def test_save_reloads_to_the_same_logits(smol, tmp_path):
    import lowbit

    work = dataclasses.replace(smol, model=copy.deepcopy(smol.model))
    report = lowbit.quantize_model(work, "q8_0", progress=False)  # what load_model returns, not only its module
    out = lowbit.save(work, tmp_path / "saved")
    back = lowbit.load_model(out, progress=False)
    ids = torch.randint(0, 49152, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(back.model(input_ids=ids).logits, work.model(input_ids=ids).logits)
    manifest = json.loads((out / "lowbit.json").read_text())
    assert manifest["scheme"] == "q8_0" and manifest["method"] == "rtn"
    # the quantized embedding is stored as its codes: the file holds what the report counts
    assert manifest["params"] == {"model.embed_tokens.weight": {"format": "q8_0", "shape": [49152, 576]}}
    size = (out / "model.safetensors").stat().st_size
    assert abs(size - report.size_bytes) < 0.002 * report.size_bytes, (size, report.size_bytes)
    with pytest.raises(LowbitError, match="already exists"):
        lowbit.save(work, out)
    lowbit.save(work, out, force=True)


# ---- complete configs ----------------------------------------------------------------------------
def _check_model_dir(d: Path, quant_method: str | None) -> None:
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama", cfg.get("architectures")
    assert not any(k in cfg for k in ("_name_or_path", "_model_name_or_path", "id2label", "label2id"))
    assert cfg.get("quantization_config", {}).get("quant_method") == quant_method
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["bos_token_id"] == cfg["bos_token_id"] and gen["eos_token_id"] == cfg["eos_token_id"]
    assert (d / "tokenizer.json").is_file()
    mask = os.umask(0)
    os.umask(mask)
    for f in d.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, (f.name, oct(f.stat().st_mode))
    assert outputs.output_kind(d) == outputs.MODEL_DIR


@pytest.mark.parametrize("layout,fmt,method", [("compressed-tensors", "int4-g64", "compressed-tensors"),
                                               ("bitsandbytes", "nf4", "bitsandbytes"), ("gptq", "int4-asym-g64", "gptq"),
                                               ("awq", "int4-asym-g64", "awq"), ("lowbit", "int4-asym-g64", "lowbit")])
def test_every_export_carries_a_complete_config(layout, fmt, method, small, tmp_path):
    import lowbit

    work = dataclasses.replace(small, model=copy.deepcopy(small.model))
    lowbit.quantize_model(work, fmt, progress=False)
    out = lowbit.save(work, tmp_path / "d") if layout == "lowbit" else lowbit.export(work, tmp_path / "d", layout)
    _check_model_dir(out, method)


def test_imported_directory_carries_a_complete_config(tmp_path):
    from lowbit.io.hf_import import import_gguf

    _check_model_dir(import_gguf("smollm2", tmp_path / "hf", progress=False), None)
