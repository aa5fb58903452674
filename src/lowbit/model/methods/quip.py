"""QuIP (Chee et al., 2023) and QuIP# (Tseng et al., 2024): incoherence processing, then GPTQ in
the rotated basis (:func:`lowbit.model.rotated.quip_quantize`); with an E8P format, QuIP#'s lattice
code book.  Its layers rotate their inputs, which no GGUF file or other engine's layout describes."""

from __future__ import annotations

import torch

from lowbit.formats import Format
from lowbit.model.methods.base import CalibConfig, LinearResult, Method, register_method, require_grid
from lowbit.model.rotated import quip_quantize


class QuIP(Method):
    name = "quip"
    description = "QuIP: random orthogonal rotations of weights and inputs, then GPTQ (QuIP# with an E8P format)"
    layerwise = True
    plain_layers = False
    order = 3

    def check_format(self, fmt: Format, name: str) -> None:
        require_grid(self, fmt, name)

    def quantize_linear(self, w: torch.Tensor, h: torch.Tensor, fmt: Format, bias: torch.Tensor | None,
                        cfg: CalibConfig, name: str, seed: int) -> LinearResult:
        mod, err, rtn, extra = quip_quantize(w, h, fmt, bias, cfg, seed=seed)
        return LinearResult(mod, mod.qtensor, err, rtn, extra)


register_method(QuIP())
