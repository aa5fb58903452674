"""AWQ (Lin et al., 2023): per input channel scales, searched on the calibration activations and
folded into the previous operation (the layer's function unchanged), that protect the channels with
the largest activations; then round-to-nearest with a searched clipping range for integer formats
(:mod:`lowbit.algorithms.awq`)."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.algorithms.awq import search_clip, search_scales
from lowbit.algorithms.hessian import InputStats, relative_output_error
from lowbit.formats import Format
from lowbit.formats.integer import IntFormat
from lowbit.model.layers import apply_scale, scale_groups
from lowbit.model.methods.base import CalibConfig, LayerLog, LinearResult, Method, register_method
from lowbit.model.quantize import QuantLinear


class AWQ(Method):
    name = "awq"
    description = "AWQ: activation-aware channel scales folded into the previous op, then a clipping search"
    layerwise = True
    streams = True
    order = 2

    def prepare_layer(self, layer: nn.Module, linears: dict[str, nn.Linear], fmts: dict[str, Format],
                      stats: dict[str, InputStats], cfg: CalibConfig, li: int, logs: list[LayerLog]) -> None:
        """Search AWQ scales for each (previous op, linears) group of the layer and fold them in.

        Scaling leaves the layer's full-precision function unchanged, so one pass of statistics serves
        every group: a group's inputs become ``x / s``, and their statistics are rescaled in place
        (``H / (s s^T)``, ``mean|x| / s``) for the quantization that follows."""
        for prev_name, names in scale_groups(layer):
            names = [n for n in names if n in linears]
            if not names:
                continue
            st = stats[names[0]]
            ws = [linears[n].weight.detach().to(torch.float32) for n in names]
            s, alpha, loss, base = search_scales(ws, [fmts[n] for n in names], st.mean_abs(), st.hessian(), cfg.awq)
            if alpha == 0.0 and bool((s == 1).all()):
                continue
            apply_scale(layer, prev_name, names, s)
            s64 = s.to(torch.float64)
            for stn in {id(stats[n]): stats[n] for n in names}.values():  # shared statistics rescaled once
                if stn.h is not None:
                    stn.h /= s64[:, None] * s64[None, :]
                stn.abs_sum /= s64
                stn.sq_sum /= s64 * s64
            logs.append(LayerLog(li, f"awq:{prev_name}", loss, base, 0.0, {"alpha": alpha}))

    def quantize_linear(self, w: torch.Tensor, h: torch.Tensor, fmt: Format, bias: torch.Tensor | None,
                        cfg: CalibConfig, name: str, seed: int) -> LinearResult:
        """Quantize an (already AWQ-scaled) weight, with the clipping search for integer formats (not
        for the query and key projections, whose errors the attention scores amplify, as AutoAWQ)."""
        imatrix = torch.diagonal(h).to(torch.float32).clamp_min(0)
        rtn = fmt.quantize(w, imatrix=imatrix)
        qt = rtn
        if cfg.awq.clip and isinstance(fmt, IntFormat) and fmt.group >= 0 and not name.endswith(("q_proj", "k_proj")):
            ratio = search_clip(w, fmt, h, cfg.awq)
            qt = fmt.quantize_clipped(w, ratio)
        err = relative_output_error(w, h)
        return LinearResult(QuantLinear(qt, bias), qt, err(fmt.dequantize(qt)), err(fmt.dequantize(rtn)))


register_method(AWQ())
