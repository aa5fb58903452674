"""SpQR (Dettmers et al., 2023): GPTQ with small groups, quantized statistics and FP16 outliers.

The columns are quantized in GPTQ's order with its error feedback (:mod:`lowbit.algorithms.gptq`).
At the start of each group of columns (16), the weights whose rounding would cost the most output
error, ``((w - q(w)) / d)^2`` with ``d`` the diagonal of the inverse-Hessian factor (GPTQ's
per-column sensitivity), are set aside as outliers; the group's statistics are fitted to the
remaining weights and quantized to 3 bits; outliers keep their FP16 value (no error to propagate).
The threshold is chosen from round-to-nearest sensitivities so that about ``outlier_fraction`` of
the weights become outliers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.algorithms.gptq import GPTQConfig, inverse_hessian_factor, run_columns
from lowbit.algorithms.hessian import relative_output_error
from lowbit.errors import FormatError
from lowbit.formats.base import Format, QTensor
from lowbit.formats.spqr import SpQRFormat


@dataclass
class SpQRConfig:
    outlier_fraction: float = 0.01
    gptq: GPTQConfig = field(default_factory=GPTQConfig)


@dataclass
class SpQRResult:
    qtensor: QTensor
    error: float
    rtn_error: float
    outliers: int
    bits_per_weight: float


def spqr_quantize(w: torch.Tensor, h: torch.Tensor, fmt: Format, cfg: SpQRConfig | None = None,
                  name: str = "tensor") -> SpQRResult:
    cfg = cfg or SpQRConfig()
    if not isinstance(fmt, SpQRFormat):
        raise FormatError(f"{name}: the SpQR method stores its result in an spqr format (e.g. spqr3-g16), not {fmt.name}")
    w0 = fmt.check(w, name)
    rows, cols = w0.shape
    G = fmt.group
    h = h.to(w0.device, torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    W = w0.clone()
    W[:, dead] = 0.0
    u, damp = inverse_hessian_factor(h, cfg.gptq.damp, cfg.gptq.max_damp)
    hinv = u.to(torch.float32)
    d = torch.diagonal(hinv)

    rtn = fmt.quantize(w0)
    sens0 = ((w0 - fmt.dequantize(rtn)) / d[None, :]) ** 2
    if cfg.outlier_fraction > 0:
        k = max(1, int(round((1.0 - cfg.outlier_fraction) * sens0.numel())))
        thr = float(sens0.reshape(-1).kthvalue(min(k, sens0.numel())).values)
    else:
        thr = float("inf")

    block = G * max(1, -(-cfg.gptq.block_size // G))
    codes = torch.empty(rows, cols, dtype=torch.int64, device=w0.device)
    is_out = torch.zeros(rows, cols, dtype=torch.bool, device=w0.device)
    out_val = torch.zeros(rows, cols, dtype=torch.float32, device=w0.device)
    stats: list[dict[str, torch.Tensor]] = []
    state: dict[str, object] = {}

    def start_group(col: int, seg: torch.Tensor) -> None:
        """Set aside the group's most sensitive weights, then fit and quantize its statistics."""
        st = fmt.fit(seg[:, None, :])
        g0 = fmt.grid_of_stats(st, G)
        sens = ((seg - g0.round(seg)) / d[None, col : col + G]) ** 2
        out = sens > thr
        if bool(out.any()):
            st = fmt.fit(seg[:, None, :], out[:, None, :])
        stats.append({k: v for k, v in st.items() if k not in ("scale", "zero")})
        state["grid"] = fmt.grid_of_stats(st, G)
        is_out[:, col : col + G] = out

    def quantize_column(col: int, x: torch.Tensor) -> torch.Tensor:
        gcol = state["grid"][col % G]  # type: ignore[index]
        q = gcol.nearest(x)
        codes[:, col] = q[:, 0]
        keep = x.to(torch.float16).to(torch.float32)  # an outlier keeps its (FP16) value: no error to pass on
        out_val[:, col] = keep[:, 0]
        return torch.where(is_out[:, col : col + 1], keep, gcol.values(q))

    run_columns(W, hinv, block, G, start_group, quantize_column)

    flat = is_out.reshape(-1).nonzero().reshape(-1)
    qt = fmt.encode((rows, cols), codes, stats, flat, out_val.reshape(-1)[flat])
    qt.meta["gptq_damp"] = damp
    err = relative_output_error(w0, h)
    return SpQRResult(qt, err(fmt.dequantize(qt)), err(fmt.dequantize(rtn)), int(flat.numel()),
                      fmt.tensor_bits(qt) / (rows * cols))
