"""Generate text with a model, timed: prefill and decode tokens per second and peak memory.

Two engines run the same prompt ids: lowbit's PyTorch path (transformers' ``generate`` on the
model as lowbit holds it, quantized layers on their kernels) and llama.cpp (a GGUF file through
llama-cpp-python).  Text is handed to ``on_text`` as it is generated.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.model.load import LoadedModel


@dataclass
class Generation:
    text: str
    prompt_ids: list[int]
    new_ids: list[int]
    prefill_s: float  # the prompt's forward pass up to the first new token
    decode_s: float  # every new token after the first
    peak_rss_mb: float
    engine: str
    format: str

    @property
    def n_new_tokens(self) -> int:
        return len(self.new_ids)

    @property
    def prefill_tokens_per_s(self) -> float:
        return len(self.prompt_ids) / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.new_ids) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")

    def summary(self) -> dict[str, object]:
        d = asdict(self)
        d.update(n_new_tokens=self.n_new_tokens, prefill_tokens_per_s=self.prefill_tokens_per_s,
                 decode_tokens_per_s=self.decode_tokens_per_s, n_prompt_tokens=len(self.prompt_ids))
        return d


def reset_peak_rss() -> None:
    """Start the process's peak resident memory (VmHWM) afresh where Linux allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_ids(loaded: LoadedModel, prompt: str, chat: bool) -> list[int]:
    """The prompt's token ids: through the model's chat template with ``chat``, else as text (with
    the model's BOS where it takes one)."""
    tok = loaded.tokenizer
    if chat:
        if not getattr(tok, "chat_template", None):
            raise LowbitError(f"--chat: {loaded.path.name} has no chat template")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,  # type: ignore[attr-defined]
                                      tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    ids = tok(prompt, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    if loaded.add_bos and loaded.bos_id is not None:
        ids = [loaded.bos_id, *ids]
    if not ids:
        raise LowbitError("--prompt: give some text (the prompt has no tokens)")
    return [int(i) for i in ids]


class _TextStream:
    """Decodes the new tokens as they come and hands on the text not handed on before (holding back
    an incomplete UTF-8 sequence)."""

    def __init__(self, tokenizer: object, on_text: Callable[[str], None] | None) -> None:
        self.tok, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.sent = 0

    def add(self, ids: list[int]) -> None:
        self.ids.extend(ids)
        text = self.text()
        if text.endswith("\ufffd"):
            return
        if self.on_text is not None and len(text) > self.sent:
            self.on_text(text[self.sent:])
        self.sent = max(self.sent, len(text))

    def text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)  # type: ignore[attr-defined]

    def finish(self) -> str:
        text = self.text()
        if self.on_text is not None and len(text) > self.sent:
            self.on_text(text[self.sent:])
        return text


def _eos_ids(loaded: LoadedModel) -> set[int]:
    out: set[int] = set()
    for src in (getattr(loaded.model, "generation_config", None), getattr(loaded.model, "config", None), loaded.tokenizer):
        v = getattr(src, "eos_token_id", None)
        if isinstance(v, int):
            out.add(v)
        elif isinstance(v, (list, tuple)):
            out.update(int(x) for x in v)
    return out


def generate_torch(loaded: LoadedModel, ids: list[int], max_new: int, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0, on_text: Callable[[str], None] | None = None,
                   label: str = "float") -> Generation:
    """``max_new`` tokens after ``ids`` (fewer where the model ends its answer) with transformers'
    ``generate``: greedy at temperature 0, else sampled (nucleus ``top_p``) from ``seed``."""
    from transformers.generation.streamers import BaseStreamer

    model = loaded.model
    dev = next(model.parameters()).device
    stream = _TextStream(loaded.tokenizer, on_text)
    marks: list[float] = []

    class Streamer(BaseStreamer):
        def put(self, value: torch.Tensor) -> None:
            marks.append(time.perf_counter())
            if len(marks) > 1:  # the first call hands over the prompt
                stream.add([int(t) for t in value.reshape(-1).tolist()])

        def end(self) -> None:
            pass

    torch.manual_seed(seed)
    sample = temperature > 0
    kw: dict[str, object] = {"do_sample": sample, "max_new_tokens": max_new, "min_new_tokens": 0}
    if sample:
        kw.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    eos = sorted(_eos_ids(loaded))
    reset_peak_rss()
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(torch.tensor([ids], device=dev), attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                             device=dev), streamer=Streamer(), eos_token_id=eos or None,
                             pad_token_id=eos[0] if eos else None, **kw)
        t1 = time.perf_counter()
    new = [int(t) for t in out[0, len(ids):].tolist()]
    text = stream.finish()
    first = marks[1] if len(marks) > 1 else t1
    return Generation(text, list(ids), new, first - t0, t1 - first, peak_rss_mb(), "torch", label)


def generate_llamacpp(path: Path, ids: list[int], max_new: int, temperature: float = 0.0, top_p: float = 1.0,
                      seed: int = 0, threads: int | None = None, tokenizer: object | None = None,
                      on_text: Callable[[str], None] | None = None) -> Generation:
    """The same with llama.cpp running the GGUF file ``path`` on the same prompt ids."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise LowbitError("--engine llama.cpp needs llama-cpp-python (bash scripts/install.sh builds it)") from None
    n_threads = threads or os.cpu_count() or 1
    try:
        llm = Llama(str(path), n_ctx=len(ids) + max_new + 8, n_batch=max(8, len(ids)), n_threads=n_threads,
                    n_threads_batch=n_threads, seed=seed, verbose=False)
    except (ValueError, RuntimeError, OSError) as exc:
        raise LowbitError(f"{path}: llama.cpp could not load this file ({str(exc).strip() or type(exc).__name__})") from None

    class _Detok:
        def decode(self, toks: list[int], skip_special_tokens: bool = True) -> str:
            return llm.detokenize(toks).decode("utf-8", errors="replace")

    stream = _TextStream(tokenizer if tokenizer is not None else _Detok(), on_text)
    eos = llm.token_eos()
    new: list[int] = []
    reset_peak_rss()
    try:
        t0 = time.perf_counter()
        first = t0
        gen = llm.generate(ids, temp=temperature, top_p=top_p if temperature > 0 else 1.0, top_k=0 if temperature > 0 else 1,
                           min_p=0.0, repeat_penalty=1.0, reset=True)
        for tok in gen:
            if not new:
                first = time.perf_counter()
            if tok == eos:
                break
            new.append(int(tok))
            stream.add([int(tok)])
            if len(new) >= max_new:
                break
        t1 = time.perf_counter()
    finally:
        llm.close()
    return Generation(stream.finish(), list(ids), new, first - t0, t1 - first, peak_rss_mb(), "llama.cpp", path.name)
