"""transformers loads lowbit checkpoints: ``AutoModelForCausalLM.from_pretrained(lowbit_dir)`` gives
the quantized model lowbit computes with (its layers on lowbit's kernels), not a float model.

:func:`install` (called by ``import lowbit``) registers lowbit's quantization config and quantizer
with transformers' registry of quantization methods, ``quant_method: "lowbit"`` in a checkpoint's
``config.json``.  It does so when transformers imports that registry (at once if it already has):
importing lowbit does not import transformers.

The quantizer builds the model with :func:`lowbit.model.checkpoint.load_checkpoint` (the same code,
so the same logits as :func:`lowbit.load_model`), swaps its quantized layers into the skeleton that
transformers made, and gives the skeleton its tensors before transformers reads the file.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

from lowbit.model.checkpoint import QUANT_METHOD, load_checkpoint
from lowbit.model.layers import set_module
from lowbit.model.quantize import QUANTIZED_PARAMS, RECIPE, QuantLinear, run_tied_head

_REGISTRY = "transformers.quantizers.auto"


class _Finder(importlib.abc.MetaPathFinder):
    """Registers lowbit with transformers right after transformers' quantizer registry is executed."""

    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname != _REGISTRY:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module):  # type: ignore[no-untyped-def]
            run(module)
            register()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    if _REGISTRY in sys.modules:
        register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def register() -> None:
    """Register lowbit's config and quantizer with transformers (once)."""
    from transformers.quantizers import auto
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if QUANT_METHOD in auto.AUTO_QUANTIZER_MAPPING:
        return

    class LowbitConfig(QuantizationConfigMixin):
        """A lowbit checkpoint's ``quantization_config``; what it holds is in the checkpoint's lowbit.json."""

        def __init__(self, **kwargs: object) -> None:
            kwargs.pop("quant_method", None)
            self.quant_method = QUANT_METHOD  # type: ignore[assignment]
            for k, v in kwargs.items():
                setattr(self, k, v)

    class LowbitQuantizer(HfQuantizer):
        """Loads a lowbit checkpoint (saving goes through ``lowbit.save``)."""

        requires_calibration = True  # lowbit quantizes with its own tools; transformers only loads

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):  # type: ignore[no-untyped-def]
            if not checkpoint_files:
                raise ValueError("a lowbit checkpoint is loaded from its directory (model.safetensors)")
            self._params = fill_skeleton(model, Path(checkpoint_files[0]).parent, getattr(self, "_dtype", None))
            return model

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:  # type: ignore[no-untyped-def]
            # a parameter stored as codes: transformers finds only its empty placeholder, which it may
            # set (its size does not match); the real values go back in after loading
            return param_name in getattr(self, "_params", {})

        def _process_model_after_weight_loading(self, model, **kwargs):  # type: ignore[no-untyped-def]
            import torch

            for m in model.modules():
                if getattr(m, "loading", False):
                    m.loading = False
            for name, value in getattr(self, "_params", {}).items():
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child,
                        torch.nn.Parameter(value, requires_grad=False))
            if self._params and getattr(model.config, "tie_word_embeddings", False):
                model.tie_weights()
            self._params = {}
            run_tied_head(model)  # the head on the same kernel as lowbit.load_model's
            return model

        def update_dtype(self, dtype):  # type: ignore[no-untyped-def]
            self._dtype = dtype
            return dtype

        def is_serializable(self) -> bool:
            return False

        @property
        def is_trainable(self) -> bool:
            return False

    auto.register_quantization_config(QUANT_METHOD)(LowbitConfig)
    auto.register_quantizer(QUANT_METHOD)(LowbitQuantizer)


def fill_skeleton(model, directory: Path, dtype=None) -> dict:  # type: ignore[no-untyped-def]
    """Give ``model`` (transformers' skeleton, on the meta device) lowbit's quantized layers and every
    tensor of the checkpoint in ``directory``, exactly as :func:`lowbit.load_model` builds them.
    Returns the parameters stored as codes (name: value), which transformers' loader would not fill."""
    import re

    import torch

    built, manifest = load_checkpoint(directory, dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32)
    for name, mod in built.named_modules():
        if isinstance(mod, QuantLinear):
            set_module(model, name, mod)
            mod.loading = True  # no placeholder in its state dict until transformers has loaded the rest
    model.load_state_dict(built.state_dict(), strict=False, assign=True)
    for p in model.parameters():
        p._is_hf_initialized = True  # type: ignore[attr-defined]
    for attr in (QUANTIZED_PARAMS, RECIPE):
        if hasattr(built, attr):
            setattr(model, attr, getattr(built, attr))
    # the placeholders of quantized weights, and quantized parameters stored as codes, are not the
    # float tensors transformers looks for: they were filled above
    names = [re.escape(f"{m}.weight") for m in manifest.get("modules", {})]
    names += [re.escape(p) for p in (manifest.get("params") or {})]
    model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | set(names)
    model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | set(names)
    return {p: built.get_parameter(p).detach() for p in (manifest.get("params") or {})}
