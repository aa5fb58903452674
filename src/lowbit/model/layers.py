"""Walking a Hugging Face causal LM: its decoder layers, the inputs they receive, running one, the
statistics of its linear layers' inputs, swapping a module, each parameter once, and the scale
folds that leave a layer's function unchanged (AWQ, SmoothQuant).

Every method that works layer by layer (GPTQ, AWQ, SpQR, QuIP, SmoothQuant, static observers, QAT)
walks the model with these; none of them knows another method's module.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from lowbit.algorithms.hessian import InputStats
from lowbit.errors import LowbitError

#: hidden states and the keyword arguments (position embeddings, masks) a decoder layer receives
LayerInputs = list[tuple[torch.Tensor, dict]]


class _Stop(Exception):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (``model.model.layers``)."""
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise LowbitError(f"{type(model).__name__}: cannot find the decoder layers (model.model.layers)")
    return layers


def layers_prefix(model: nn.Module, layers: nn.ModuleList | None = None) -> str:
    """The module name of the decoder layers' list (``model.layers``): layer ``i``'s parameters are
    named ``{prefix}.{i}.…``."""
    layers = decoder_layers(model) if layers is None else layers
    for n, m in model.named_modules():
        if m is layers:
            return n
    raise LowbitError("decoder layers not found among the model's modules")


def capture_layer_inputs(model: nn.Module, chunks: torch.Tensor, batch_size: int,
                         device: str | torch.device = "cpu") -> LayerInputs:
    """Hidden states (and the keyword arguments: position embeddings, masks) that the first decoder
    layer receives for each batch of ``chunks``; the rest of the model is not run."""
    layers = decoder_layers(model)
    got: LayerInputs = []

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        hs = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        got.append((hs.detach(), kw))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for i in range(0, len(chunks), batch_size):
                try:
                    model.model(input_ids=chunks[i : i + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return got


def run_layer(layer: nn.Module, batches: LayerInputs, keep: bool = True) -> list[torch.Tensor]:
    """Run a decoder layer on each batch; its hidden-state outputs when ``keep``."""
    outs = []
    with torch.inference_mode():
        for hs, kw in batches:
            out = layer(hs, **kw)
            if isinstance(out, tuple):
                out = out[0]
            if keep:
                outs.append(out.detach())
    return outs


def next_inputs(layer: nn.Module, batches: LayerInputs) -> LayerInputs:
    """The inputs of the layer after ``layer``: its outputs on ``batches``, with the same keywords."""
    outs = run_layer(layer, batches, keep=True)
    return [(o, kw) for o, (_, kw) in zip(outs, batches, strict=True)]


def collect_input_stats(layer: nn.Module, linears: dict[str, nn.Linear], batches: LayerInputs,
                        hessian: bool = True) -> dict[str, InputStats]:
    """Input statistics of each linear layer over ``batches``.  Linear layers that receive the very
    same input tensor (q/k/v after the input norm, gate/up after the feed-forward norm) share one
    :class:`InputStats`: the Hessian is accumulated and held once for them."""
    stats: dict[str, InputStats] = {}
    seen: list[tuple[torch.Tensor, InputStats]] = []  # this batch's inputs (kept alive: identity is safe)
    owner: dict[int, str] = {}  # id of an InputStats -> the layer that accumulates into it

    def hook(n: str, x: torch.Tensor) -> None:
        for t, st in seen:
            if t is x:
                if stats.setdefault(n, st) is not st:
                    raise LowbitError(f"calibration: {n} shared another layer's input in one batch and not in another")
                return
        st = stats.get(n)
        if st is None:
            with torch.inference_mode(False):  # normal tensors, updated in place after the forward passes
                st = stats[n] = InputStats(linears[n].in_features, linears[n].weight.device, hessian)
            owner[id(st)] = n
        elif owner[id(st)] != n:  # shared another layer's input before, but not this one now
            raise LowbitError(f"calibration: {n} shared another layer's input in one batch and not in another")
        st.add(x)
        seen.append((x, st))

    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: hook(n, a[0])) for n, m in linears.items()]
    try:
        for batch in batches:
            seen.clear()
            run_layer(layer, [batch], keep=False)
    finally:
        seen.clear()
        for h in hooks:
            h.remove()
    return stats


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule ``name`` (dotted) of ``root``."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def unique_params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Each parameter once (a tied embedding and head share one), under its first name."""
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        yield name, p


def shared_param_ids(model: nn.Module) -> set[int]:
    """ids of parameters used by more than one module (tied embeddings)."""
    count: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        count[id(p)] = count.get(id(p), 0) + 1
    return {k for k, v in count.items() if v > 1}


# ---- scales folded into the previous operation ---------------------------------------------------
def scale_groups(layer: nn.Module) -> list[tuple[str, list[str]]]:
    """(previous op, linear layers it feeds) pairs where a scale can be folded into the previous op:
    the input norm into q/k/v, the post-attention norm into gate/up, up into down, and v into o when
    their shapes allow (no grouped-query attention)."""
    names = {n for n, _ in layer.named_modules()}
    groups = []
    if {"input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"} <= names:
        groups.append(("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]))
    if {"self_attn.v_proj", "self_attn.o_proj"} <= names:
        v, o = layer.get_submodule("self_attn.v_proj"), layer.get_submodule("self_attn.o_proj")
        if v.weight.shape[0] == o.weight.shape[1]:
            groups.append(("self_attn.v_proj", ["self_attn.o_proj"]))
    ffn_norm = "pre_feedforward_layernorm" if "pre_feedforward_layernorm" in names else "post_attention_layernorm"
    if {ffn_norm, "mlp.gate_proj", "mlp.up_proj"} <= names:
        groups.append((ffn_norm, ["mlp.gate_proj", "mlp.up_proj"]))
    if {"mlp.up_proj", "mlp.down_proj"} <= names:
        groups.append(("mlp.up_proj", ["mlp.down_proj"]))
    return groups


def fold_into_previous(prev: nn.Module, s: torch.Tensor) -> None:
    """Divide the outputs of ``prev`` (a norm or a linear layer) by ``s``."""
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            prev.weight.div_(s[:, None].to(prev.weight.dtype))
            if prev.bias is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
            return
        w = getattr(prev, "weight", None)
        if w is None:
            raise LowbitError(f"cannot fold a scale into {type(prev).__name__}")
        if "Gemma" in type(prev).__name__:  # Gemma's norms multiply by (1 + weight)
            w.copy_(((1.0 + w.float()) / s - 1.0).to(w.dtype))
        else:
            w.div_(s.to(w.dtype))


def apply_scale(layer: nn.Module, prev_name: str, names: list[str], s: torch.Tensor) -> None:
    """Multiply the input columns of the linear layers ``names`` by ``s`` and divide the outputs of
    ``prev_name`` by it: the layer computes the same function (exactly, in full precision)."""
    fold_into_previous(layer.get_submodule(prev_name), s)
    with torch.no_grad():
        for n in names:
            w = layer.get_submodule(n).weight
            w.mul_(s[None, :].to(w.dtype))
