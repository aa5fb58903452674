"""A recipe: what to quantize a model into and how, parsed and checked once, and the one verb that
applies it.

    from lowbit.model.recipe import Recipe, quantize
    recipe = Recipe.parse("q3_k_m+gptq")           # scheme + method (+imatrix), validated here
    report = quantize(model, recipe, chunks=calib)  # calibration token chunks for calibrated methods

The text is ``scheme[+method][+imatrix]``: a scheme is a lowbit tensor format (``int4-g128``,
``nf4``), a llama.cpp file type (``q4_k_m``) or an activation scheme (``w8a8``); a method is any
registered one (:mod:`lowbit.model.methods`; ``+smoothquant=0.8`` also sets SmoothQuant's alpha);
``+imatrix`` asks round-to-nearest to weigh errors by an importance matrix.  ``lowbit quantize``,
``lowbit compare`` and the streaming GGUF writer all read their work from a recipe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.errors import LowbitError, did_you_mean
from lowbit.model.calibrate import calibrate_quantize, check_method_formats
from lowbit.model.gguf_mix import FILE_TYPES
from lowbit.model.methods import CalibConfig, Method, RunInputs, get_method, list_methods
from lowbit.model.policy import TensorChoice
from lowbit.model.qat import QATConfig
from lowbit.model.quantize import QuantReport, as_module
from lowbit.model.schemes import Scheme, resolve_scheme

IMATRIX = "imatrix"


def parse_alpha(value: str, where: str = "") -> float | None:
    """SmoothQuant's alpha from text: a number in [0, 1], or 'auto' (None: searched per group)."""
    if value.strip().lower() == "auto":
        return None
    try:
        a = float(value)
    except ValueError:
        a = -1.0
    if not 0.0 <= a <= 1.0:
        raise LowbitError(f"{where}SmoothQuant alpha must be a number in [0, 1] or 'auto', not '{value}'")
    return a


@dataclass(frozen=True)
class Recipe:
    """A scheme, the method that chooses its codes and the method's settings; ``output`` (``gguf``,
    ``checkpoint`` or an export layout's name) when the recipe is checked against one."""

    scheme: Scheme
    method: Method
    imatrix: bool = False
    alpha_text: str = ""  # SmoothQuant's alpha as given in the text ('0.8', 'auto')
    calib: CalibConfig = field(default_factory=CalibConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    output: str | None = None

    # ---- parsing --------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, method: str | None = None, imatrix: bool = False, output: str | None = None,
              calib: CalibConfig | None = None, qat: QATConfig | None = None) -> Recipe:
        """The recipe ``text`` names (``method`` and ``imatrix`` may also be given apart, as the CLI's
        options do), every combination checked; one clear LowbitError otherwise."""
        parts = str(text).strip().lower().split("+")
        name, alpha = parts[0], ""
        known = list_methods()
        for p in parts[1:]:
            if p == IMATRIX:
                imatrix = True
            elif p.startswith("smoothquant="):
                method, alpha = "smoothquant", p.split("=", 1)[1]
                parse_alpha(alpha, f"'{text}': ")
            elif p in known:
                method = p
            else:
                raise LowbitError(f"'{text}': unknown suffix '+{p}'{did_you_mean(p, (IMATRIX, *known))} "
                                  f"(use +imatrix or a method: {', '.join(known)})")
        scheme = resolve_scheme(name)
        recipe = cls(scheme, get_method(method or "rtn"), imatrix, alpha, calib or CalibConfig(), qat or QATConfig())
        recipe.check()
        if output is not None:
            recipe = dataclasses.replace(recipe, output=output)
            recipe.check_output(output)
        return recipe

    @property
    def label(self) -> str:
        """The recipe as text, the scheme's own name first (``int4-g128+gptq``, ``q4_k_m+imatrix``)."""
        m = "" if self.method.name == "rtn" else f"+{self.method.name}" + (f"={self.alpha_text}" if self.alpha_text else "")
        return self.scheme.name + m + ("+" + IMATRIX if self.imatrix else "")

    @property
    def alpha(self) -> float | None:
        """SmoothQuant's alpha: the text's, else the calibration settings' (None: searched)."""
        return parse_alpha(self.alpha_text) if self.alpha_text else self.calib.smooth_alpha

    @property
    def needs_calibration(self) -> bool:
        """Whether the recipe reads calibration text (a calibrated method, or static activation ranges)."""
        return self.method.calibrated or bool(self.scheme.act is not None and self.scheme.act.static)

    def with_settings(self, calib: CalibConfig | None = None, qat: QATConfig | None = None) -> Recipe:
        return dataclasses.replace(self, calib=calib or self.calib, qat=qat or self.qat)

    # ---- checks ---------------------------------------------------------------------------------
    def check(self) -> None:
        """The method applies to the scheme, and the importance matrix to both."""
        m, act, where = self.method, self.scheme.act, f"'{self.label}': "
        if act is None and not m.weights:
            raise LowbitError(f"{where}SmoothQuant smooths activations; use it with an activation scheme "
                              "(w8a8+smoothquant, w4a4+smoothquant, w8a8-static+smoothquant)")
        if act is not None and not m.activations:
            ok = [n for n in list_methods() if get_method(n).activations]
            ok = ", ".join(ok[:-1]) + " and " + ok[-1] if len(ok) > 1 else ok[0]
            raise LowbitError(f"{where}{act.name} quantizes activations: its methods are {ok}, not {m.name}")
        if self.imatrix and not m.takes_imatrix:
            raise LowbitError(f"{where}{m.name} weighs errors with the calibration Hessian already; drop '+imatrix' "
                              "(the importance matrix is for round-to-nearest)")
        if self.imatrix and act is not None:
            raise LowbitError(f"{where}the importance matrix is for weight formats that take one (K-quants, IQ4, "
                              "Q4_0...)")

    def check_output(self, kind: str) -> None:
        """The output ``kind`` can hold what the recipe makes: a GGUF file takes llama.cpp's types and
        plain layers, the export layouts a weight-only model of plain layers."""
        s, m = self.scheme, self.method
        if kind not in ("gguf", "checkpoint") and (s.act is not None or not m.plain_layers):
            raise LowbitError(f"--out-format {kind} writes a directory of a weight-only model "
                              "(not activation schemes, not QuIP's rotated layers)")
        if kind != "gguf":
            return
        if s.act is not None:
            raise LowbitError(f"{s.name} quantizes activations, which GGUF files cannot describe; give an --out "
                              "directory for a lowbit checkpoint")
        if s.file_type is None:
            raise LowbitError(f"format {s.name} has no GGUF type; GGUF output takes {', '.join(sorted(FILE_TYPES))} "
                              "(write a lowbit checkpoint directory instead: an --out without .gguf)")
        if not m.plain_layers:
            raise LowbitError(f"{m.name}'s rotated layers cannot go into a GGUF file (llama.cpp does not rotate "
                              "their inputs); give an --out directory for a lowbit checkpoint")

    def check_plan(self, choices: dict[str, TensorChoice]) -> None:
        """Refuse a format the method cannot produce before any work is done (``choices``: the plan of
        a model's tensors, Hugging Face or GGUF names)."""
        check_method_formats(choices, self.method)


def quantize(model: object, recipe: Recipe | str, *, chunks: torch.Tensor | None = None,
             imatrix: dict | None = None, teacher: nn.Module | None = None, progress: bool = True) -> QuantReport:
    """Quantize ``model`` (a module, or what :func:`lowbit.load_model` returns) in place with
    ``recipe`` (or its text) and return what was stored for every tensor.  ``chunks``: calibration
    token ids ``[n, seq_len]``, for the recipes that read calibration text; ``imatrix``: importance
    vectors by tensor name, for ``+imatrix``; ``teacher``: QAT's original (a copy of the model when
    None).  The report's ``logs`` hold a layer-wise method's per-layer errors, its ``measured`` what
    else the method measured (SmoothQuant's alphas, QAT's losses)."""
    recipe = Recipe.parse(recipe) if isinstance(recipe, str) else recipe
    if recipe.needs_calibration and (chunks is None or len(chunks) == 0):
        raise LowbitError(f"{recipe.label} needs calibration text (chunks of token ids)")
    if recipe.imatrix and not imatrix:
        raise LowbitError(f"{recipe.label} needs an importance matrix")
    m = recipe.method
    if m.layerwise:
        report, logs = calibrate_quantize(model, recipe.scheme.name, chunks,  # type: ignore[arg-type]
                                          dataclasses.replace(recipe.calib, method=m.name), progress=progress)
        report.logs = logs
        return report
    inputs = RunInputs(chunks, recipe.calib, recipe.qat, imatrix if recipe.imatrix else None, teacher, recipe.alpha,
                       progress)
    report, measured = m.run(as_module(model), recipe.scheme, inputs)
    report.measured = measured
    return report
