"""Real packed export in compressed-tensors ``pack-quantized`` format (weight-only, integer grids).

The modules are grouped by (bits, group size, symmetric) into ``config_groups`` whose ``targets``
name each module exactly (``re:^model\\.layers\\.3\\.mlp\\.down_proj$``), so mixed per-layer bits
(LieQ/NSDS) are one checkpoint. The scales and zeros are the ones the fake-quant weights were made
with, so the packed codes are exactly those weights: transformers reloads the folder on CPU with
``CompressedTensorsConfig(run_compressed=False)`` and gets the same dequantized tensors.
Needs the optional ``compressed-tensors`` package (``pip install -e ".[quant]"``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch


def available() -> bool:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        return False
    return True


def export_packed(model, tokenizer, grids: dict[str, dict], meta: dict[str, dict], out_dir: Path) -> Path:
    """Write ``out_dir`` as a compressed-tensors checkpoint of `model` (whose targeted weights are
    already fake-quantized). `grids`: per module the ``scale`` and ``zero`` ([out, groups], uint
    zero in 0 .. 2^b - 1) of its grid; `meta`: per module bits, group_size and sym."""
    import copy

    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    from runner import atomic

    groups: dict[tuple, list[str]] = {}
    for name, m in meta.items():
        groups.setdefault((m["bits"], m["group_size"], m["sym"]), []).append(name)
    config_groups = {}
    for i, ((bits, group_size, sym), names) in enumerate(sorted(groups.items())):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym,
                                strategy="channel" if group_size == -1 else "group",
                                group_size=None if group_size == -1 else group_size)
        config_groups[f"group_{i}"] = QuantizationScheme(
            targets=[f"re:^{re.escape(n)}$" for n in names], weights=args)
    qconfig = QuantizationConfig(config_groups=config_groups, format="pack-quantized",
                                 quantization_status=QuantizationStatus.FROZEN)

    packed = copy.deepcopy(model).cpu()
    apply_quantization_config(packed, qconfig, show_progress=False)
    modules = dict(packed.named_modules())
    for name, grid in grids.items():
        module, bits = modules[name], meta[name]["bits"]
        scale = grid["scale"].reshape(module.weight_scale.shape)
        module.weight_scale.data.copy_(scale.to(module.weight_scale.dtype))
        if hasattr(module, "weight_zero_point"):
            # our zero is unsigned (0 .. 2^b - 1); compressed-tensors stores codes signed
            signed = (grid["zero"] - 2 ** (bits - 1)).reshape(module.weight_zero_point.shape)
            module.weight_zero_point.data.copy_(signed.to(module.weight_zero_point.dtype))
    compressor = ModelCompressor.from_pretrained_model(packed, quantization_format="pack-quantized")
    compressor.compress_model(packed)
    with atomic.folder(out_dir) as tmp:
        packed.save_pretrained(tmp)
        compressor.update_config(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir


def load_packed(path: Path, dtype: torch.dtype = torch.float32):
    """The packed checkpoint decompressed to a dense model on CPU, every module with its own scheme.

    transformers' own ``CompressedTensorsConfig(dequantize=True)`` reload is exact when one scheme
    covers every module, but (5.23) decompresses every dense module with the first config group's
    scheme, which garbles mixed-bit exports; this loader matches each module to its group instead.
    """
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    qconfig = QuantizationConfig.model_validate(config.quantization_config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(shard))
    dense = {k: v for k, v in state.items() if not k.rsplit(".", 1)[-1].startswith("weight_")}
    for key in [k for k in state if k.endswith(".weight_packed")]:
        name = key[: -len(".weight_packed")]
        scheme = next(g for g in qconfig.config_groups.values()
                      if any(t.startswith("re:") and re.match(t[3:], name) for t in g.targets))
        parts = {k.rsplit(".", 1)[-1]: v for k, v in state.items() if k.rsplit(".", 1)[0] == name}
        compressor = BaseCompressor.get_value_from_registry(scheme.format or qconfig.format)
        dense[f"{name}.weight"] = compressor.decompress(parts, scheme)["weight"]
    model.load_state_dict({k: v.to(dtype) for k, v in dense.items()}, strict=False)
    model.tie_weights()
    return model.eval()
