"""Linear layers stored in a rotated basis (QuIP-style incoherence processing).

The stored weight is ``Q(R_out W R_in^T)``; at run time the input is rotated, multiplied by the
dequantized weight and rotated back: ``y = ((x R_in^T) Q(W')^T) R_out + b``.  With ``Q`` the
identity this is exactly ``x W^T + b``: rotations are orthogonal.
"""

from __future__ import annotations

import torch

from lowbit.algorithms.gptq import gptq_quantize
from lowbit.algorithms.hessian import relative_output_error
from lowbit.algorithms.rotation import Rotation, rotate_hessian, rotate_weight
from lowbit.formats import Format, QTensor
from lowbit.model.quantize import QuantLinear


class RotatedQuantLinear(QuantLinear):
    """A :class:`QuantLinear` whose stored weight is in a rotated basis: the input is rotated before
    the kernel's product and the output rotated back."""

    kind = "rotated"

    def __init__(self, qt: QTensor, bias: torch.Tensor | None, seed_in: int, seed_out: int,
                 backend: str | None = None) -> None:
        super().__init__(qt, bias, backend)
        self.meta = dict(qt.meta, rotation_seeds=(seed_in, seed_out))
        self.r_in = Rotation(self.in_features, seed_in)
        self.r_out = Rotation(self.out_features, seed_out)

    def rotated_weight(self) -> torch.Tensor:
        return self.stored_weight()

    def dequantized_weight(self) -> torch.Tensor:
        """The effective weight ``R_out^T Q(W') R_in`` in the original basis."""
        wq = self.rotated_weight().to(torch.float64)
        return self.r_out.apply_inverse(self.r_in.apply_inverse(wq).t()).t().to(torch.float32)

    def kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.r_in.apply(x)

    def kernel_output(self, y: torch.Tensor) -> torch.Tensor:
        return self.r_out.apply_inverse(y)

    def manifest_extra(self) -> dict[str, object]:
        return {"rotation_seeds": [self.r_in.seed, self.r_out.seed]}

    @classmethod
    def from_manifest(cls, qt: QTensor, bias: torch.Tensor | None, entry: dict) -> RotatedQuantLinear:
        s_in, s_out = entry["rotation_seeds"]
        return cls(qt, bias, int(s_in), int(s_out))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, format={self.fmt.name}, "
                f"rotations=({self.r_in.kind}; {self.r_out.kind})")


def quip_quantize(w: torch.Tensor, h: torch.Tensor, fmt: Format, bias: torch.Tensor | None, cfg, seed: int  # type: ignore[no-untyped-def]
                  ) -> tuple[RotatedQuantLinear, float, float, dict[str, float]]:
    """Incoherence processing + GPTQ: rotate the weight and its Hessian, run GPTQ in the rotated
    basis, and return the layer with the relative output errors of this and of plain
    round-to-nearest in the original basis (both measured on the original Hessian)."""
    rows, cols = w.shape
    seed_in, seed_out = 2 * seed + 1, 2 * seed + 2
    r_in, r_out = Rotation(cols, seed_in), Rotation(rows, seed_out)
    w64 = w.to(torch.float64)
    wr = rotate_weight(w64, r_out, r_in).to(torch.float32)
    hr = rotate_hessian(h.to(torch.float64), r_in)
    res = gptq_quantize(wr, hr, fmt, cfg.gptq)
    mod = RotatedQuantLinear(res.qtensor, bias, seed_in, seed_out)
    rel = relative_output_error(w, h)
    return mod, rel(mod.dequantized_weight()), rel(fmt.roundtrip(w)), {"damp": res.damp, "rotated_rtn_error": res.rtn_error}
