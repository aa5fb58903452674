"""Which device quantizes which tensor, for models larger than one accelerator.

:func:`plan_devices` places a Hugging Face model's modules across devices with accelerate's
``infer_auto_device_map`` (computed on an empty, meta-device model: nothing is loaded), decoder
layers kept whole, in order, filling each device up to its ``max_memory``; :func:`device_for`
gives the device of a parameter under such a map.  The streaming GGUF writer
(:func:`lowbit.io.hf_stream.write_gguf_streaming`) quantizes each tensor on its layer's device, so
on several GPUs the tensors of layer i go to the GPU that would hold layer i at inference.  With
no accelerator the map is ``{"": "cpu"}`` and everything runs on the CPU.
"""

from __future__ import annotations

from pathlib import Path

from lowbit.errors import LowbitError


def plan_devices(path: Path, max_memory: dict[int | str, int | str] | None = None,
                 dtype: str = "float16") -> dict[str, str]:
    """An accelerate device map (module name -> ``"cuda:i"`` or ``"cpu"``) for the model in ``path``
    (a Hugging Face directory; its config is read, no weights): ``max_memory`` maps GPU indices (and
    ``"cpu"``) to what each may hold (default: the visible GPUs' memory), decoder layers not split."""
    import torch
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if max_memory is None:
        if not torch.cuda.is_available():
            return {"": "cpu"}
        max_memory = {i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
    try:
        cfg = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise LowbitError(f"{path}: could not read config.json ({type(exc).__name__}: {exc})") from None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    no_split = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("DecoderLayer")})
    import warnings

    with warnings.catch_warnings():  # accelerate warns about GPUs it cannot see when planning for others
        warnings.simplefilter("ignore")
        dmap = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    if any(d == "disk" for d in dmap.values()):
        raise LowbitError(f"{path}: the model does not fit the devices' memory {max_memory} (accelerate put "
                          "modules on disk)")
    return {k: (f"cuda:{d}" if isinstance(d, int) else str(d)) for k, d in dmap.items()}


def device_for(param: str, device_map: dict[str, str]) -> str:
    """The device of parameter ``param`` (a Hugging Face name) under ``device_map``: its longest
    module prefix in the map."""
    best, dev = -1, None
    for module, d in device_map.items():
        if (module == "" or param == module or param.startswith(module + ".")) and len(module) > best:
            best, dev = len(module), d
    if dev is None:
        raise LowbitError(f"{param}: no device in the device map (modules: {', '.join(list(device_map)[:5])} ...)")
    return dev
