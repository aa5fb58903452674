"""A GGUF header parsed once is reused when the same file is opened again, and never when its header
bytes changed (a file rewritten in place with the same size)."""

from __future__ import annotations

import gguf
import numpy as np

from lowbit.model.gguf_file import GGUFFile


def _write(path, name: str) -> None:
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(name)
    w.add_token_list([f"tok{i}" for i in range(300)])
    w.add_tensor("token_embd.weight", np.arange(300 * 32, dtype=np.float32).reshape(300, 32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_rewritten_header_is_parsed_again(tmp_path):
    path = tmp_path / "m.gguf"
    _write(path, "aaaa")
    first = GGUFFile(path)
    again = GGUFFile(path)
    assert again.field("general.name") == "aaaa" and again.kv == first.kv and again.tensors == first.tensors
    size = path.stat().st_size
    _write(path, "bbbb")  # same length, other bytes, possibly within the same mtime tick
    assert path.stat().st_size == size
    assert GGUFFile(path).field("general.name") == "bbbb"
    assert GGUFFile(path).field("tokenizer.ggml.tokens")[299] == "tok299"
    assert np.array_equal(GGUFFile(path).raw("token_embd.weight").view(np.float32).reshape(300, 32)[5],
                          np.arange(160, 192, dtype=np.float32))
