"""Trainable YOLOX-Nano weights recovered from an fp32 ONNX file that build_yolox exported.

Build-time only. The exporter folds every BatchNorm into the convolution before it, so the
file holds one weight and one bias per convolution. Loading them back as a conv with an
identity BatchNorm reproduces the exported function exactly in eval mode, but not in train
mode, where BatchNorm normalises with the batch's statistics. So the BatchNorms are split
out again from statistics measured on real images: with mean m and variance v of a conv's
output, gamma = sqrt(v + eps), beta = m + bias and running stats (m, v) make the train-mode
layer close to the identity on that data and the eval-mode layer exactly the folded one.

    state = state_from_onnx(Path("models/bundled/yolox-nano-onnx-fp32/model.onnx"), images, 6)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.scripts.yolox_arch import build_nano


def _onnx_convs(path: Path) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(node name, weight, bias or None) of each Conv node, in graph order."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    convs = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        weight = inits.get(node.input[1])
        if weight is None:
            raise ValueError(f"{path}: Conv {node.name} has a computed weight, not a constant")
        bias = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        convs.append((node.name, weight, bias))
    return convs


def _torch_convs(model: nn.Module, size: int) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]:
    """Each Conv2d in the order a forward pass runs it, with the BatchNorm that follows it."""
    bn_after: dict[int, nn.BatchNorm2d] = {}
    for module in model.modules():
        conv, bn = getattr(module, "conv", None), getattr(module, "bn", None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            bn_after[id(conv)] = bn
    order: list[nn.Conv2d] = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, _o: order.append(mod))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    return [(conv, bn_after.get(id(conv))) for conv in order]


def state_from_onnx(path: Path, images: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """A YOLOX-Nano state_dict equal to the ONNX file in eval mode, with BatchNorms re-split.

    `images` is a float32 [N, 3, S, S] batch of letterboxed 0..255 training images (a few
    dozen are enough) that the BatchNorm statistics are measured on.
    """
    convs = _onnx_convs(path)
    model = build_nano(num_classes).eval()
    targets = _torch_convs(model, int(images.shape[-1]))
    if len(targets) != len(convs):
        raise ValueError(
            f"{path}: {len(convs)} Conv nodes, YOLOX-Nano has {len(targets)} convolutions"
        )
    for (name, weight, bias), (conv, bn) in zip(convs, targets, strict=True):
        if tuple(weight.shape) != tuple(conv.weight.shape):
            raise ValueError(
                f"{path}: Conv {name} weight {tuple(weight.shape)} where YOLOX-Nano has "
                f"{tuple(conv.weight.shape)}: not a YOLOX-Nano export"
            )
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(np.array(weight)))
            folded = torch.from_numpy(
                np.array(bias) if bias is not None else np.zeros(weight.shape[0], weight.dtype)
            )
            if bn is None:
                if conv.bias is None:
                    raise ValueError(f"{path}: Conv {name} has a bias YOLOX-Nano lacks")
                conv.bias.copy_(folded)
                continue
            running_mean, running_var = _running_stats(bn)
            bn.weight.fill_(1.0)
            bn.bias.copy_(folded)
            running_mean.zero_()
            running_var.fill_(1.0 - bn.eps)
    _resplit_batchnorms(model, images)
    return model.state_dict()


def _running_stats(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("a BatchNorm without running statistics: not a YOLOX-Nano model")
    return bn.running_mean, bn.running_var


def _resplit_batchnorms(model: nn.Module, images: torch.Tensor) -> None:
    """Move each BatchNorm's scale and shift to the statistics of its input on `images`."""
    sums: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}  # sum, sum of squares, n

    def measure(module: nn.Module, inputs: tuple[torch.Tensor, ...], _out: Any) -> None:
        x = inputs[0].double()
        s, sq, n = x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), x.numel() // x.shape[1]
        if id(module) in sums:
            s0, sq0, n0 = sums[id(module)]
            s, sq, n = s + s0, sq + sq0, n + n0
        sums[id(module)] = (s, sq, n)

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    hooks = [bn.register_forward_hook(measure) for bn in bns]
    try:
        with torch.no_grad():
            for start in range(0, len(images), 8):
                model(images[start : start + 8])
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        for bn in bns:
            s, sq, n = sums[id(bn)]
            mean = s / n
            var = (sq / n - mean * mean).clamp_min(0.0)
            # the identity BN above adds the folded bias: y = x + b
            folded = bn.bias.double().clone()
            running_mean, running_var = _running_stats(bn)
            running_mean.copy_(mean.float())
            running_var.copy_(var.float())
            bn.weight.copy_(torch.sqrt(var + bn.eps).float())
            bn.bias.copy_((mean + folded).float())
