"""The real producers, as tests call them: llm-compressor 0.14's model-free NVFP4A16 path (compressed-tensors
code, with the observer glue re-typed) and ModelOpt 0.47's ``NVFP4QTensor`` (its own source, loaded with
torch only when the package is installed without its dependencies)."""

from __future__ import annotations

import ast
import importlib.util
import sys
import types
from pathlib import Path

import torch
from compressed_tensors.compressors.nvfp4 import NVFP4PackedCompressor
from compressed_tensors.quantization import initialize_module_for_quantization
from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

SCHEME = preset_name_to_scheme("NVFP4A16", ["Linear"])


def llmcompressor_compress(members: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """What llm-compressor 0.14 writes for one fused group of BF16 weights (model-free PTQ path):
    ``MemorylessMinMaxObserver`` statistics (BF16 amin/amax per 16-block), ``Observer.get_global_scale``
    over the group, ``calculate_qparams``, values stored in the Linear's BF16 qparams, then the
    compressed-tensors NVFP4 compressor."""
    stats = []
    for w in members:
        obs = w.unflatten(-1, (-1, 16)).unsqueeze(0)  # flatten_for_calibration, TENSOR_GROUP
        stats.append((torch.amin(obs, dim=(0, -1)), torch.amax(obs, dim=(0, -1))))
    absmax = stats[0][1].max()
    for mn, mx in stats:  # Observer.get_global_scale
        absmax = torch.max(absmax, -mn.min())
        absmax = torch.max(absmax, mx.max())
    gs = generate_gparam(-absmax.reshape(1), absmax.reshape(1))
    out = []
    for w, (mn, mx) in zip(members, stats):
        scale, _ = calculate_qparams(min_vals=mn, max_vals=mx, quantization_args=SCHEME.weights, global_scale=gs)
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
        lin.weight.data.copy_(w)
        initialize_module_for_quantization(lin, SCHEME)  # weight_scale is BF16, weight_global_scale fp32 [1]
        lin.weight_scale.data.copy_(scale)
        lin.weight_global_scale.data.copy_(gs)
        sd = {n: getattr(lin, n).data for n in ("weight", "weight_scale", "weight_global_scale")}
        out.append(NVFP4PackedCompressor.compress(sd, SCHEME))
    return out


def load_modelopt_nvfp4():
    """The real ``NVFP4QTensor`` of an importable ``modelopt``: imported normally, or, when the package was
    installed without its dependencies, by executing its own nvfp4_tensor.py / numeric_utils.py and the
    three reduce helpers of core_utils.py with torch only."""
    spec = importlib.util.find_spec("modelopt")
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

        return NVFP4QTensor
    except Exception:
        pass
    q = Path(list(spec.submodule_search_locations)[0]) / "torch" / "quantization"
    root = "_modelopt_nvfp4_src"

    def module(name, path=None, keep=None):
        m = types.ModuleType(root + name)
        m.__path__ = []
        m.__package__ = (root + name).rpartition(".")[0] if path is not None else root + name
        m.__dict__.update(torch=torch, F=torch.nn.functional, nn=torch.nn, Any=object)
        sys.modules[m.__name__] = m
        if path is not None:
            tree = ast.parse(Path(path).read_text())
            if keep is not None:
                tree.body = [n for n in tree.body if getattr(n, "name", None) in keep or isinstance(n, ast.Assign)
                             and any(getattr(t, "id", None) in keep for t in n.targets)]
            exec(compile(tree, str(path), "exec"), m.__dict__)
        return m

    module("")
    module(".backends")
    module(".backends.utils", q / "backends" / "utils.py")
    module(".qtensor")
    module(".qtensor.base_qtensor", q / "qtensor" / "base_qtensor.py", keep={"BaseQuantizedTensor"})
    module(".utils", q / "utils" / "core_utils.py",
           keep={"reduce_amax", "reduce_block_amax", "reduce_block_padding", "_FP8_DTYPES"})
    module(".utils.numeric_utils", q / "utils" / "numeric_utils.py")
    return module(".qtensor.nvfp4_tensor", q / "qtensor" / "nvfp4_tensor.py").NVFP4QTensor




def modelopt_export(members: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """What ModelOpt 0.47's unified HF export writes for one fused group of BF16 weights on a GPU:
    ``weight_scale_2 = amax_group / 2688`` (torch on CUDA: ``amax * fp32(1/2688)``), then
    ``NVFP4QTensor.quantize(w, 16, None, weight_scale_2)`` per member.  Returns (weight, weight_scale,
    weight_scale_2) per member.  Installed by the test extra (``pip install -e ".[test]"``)."""
    Q = load_modelopt_nvfp4()
    if Q is None:
        raise RuntimeError("modelopt is not importable: pip install -e \".[test]\" (nvidia-modelopt==0.47.0)")
    amax = max(float(w.float().abs().max()) for w in members)
    w2 = torch.tensor(amax, dtype=torch.float32) * torch.tensor(1.0 / 2688.0, dtype=torch.float32)
    if amax == 0:
        w2 = torch.tensor(1.0)  # ModelOpt writes 0 here (NaN scales); both sides guard it the same way
    out = []
    for w in members:
        qt, s, _ = Q.quantize(w, 16, None, w2)
        out.append((qt._quantized_data, s, w2))
    return out
