"""YOLOX-Nano built from pixeltable-yolox's classes, initialised as the official YOLOX does.

Build-time only. Puts the pure-torch `tvshim` on sys.path when the real torchvision is
missing or broken (pixeltable-yolox imports torchvision only for NMS).
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

SHIM_DIR = Path(__file__).resolve().parent / "tvshim"

# exps/default/yolox_nano.py
NANO_DEPTH = 0.33
NANO_WIDTH = 0.25
IN_CHANNELS = [256, 512, 1024]
STRIDES = [8, 16, 32]


def _ensure_torchvision() -> None:
    """Import the real torchvision if it works; otherwise put the NMS shim in its place."""
    try:
        import torchvision
    except Exception:  # any failure (missing, or its C ops not matching this torch)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        if str(SHIM_DIR) not in sys.path:
            sys.path.insert(0, str(SHIM_DIR))
        import torchvision  # noqa: F401


def build_nano(num_classes: int) -> nn.Module:
    """YOLOX-Nano (depth 0.33, width 0.25, depthwise, SiLU), in train mode as constructed.

    Weights are torch's default init, then BN eps 1e-3 / momentum 0.03 and the head's
    prior-probability biases (1e-2), as `yolox.exp.Exp.get_model`. Seed torch first for
    reproducible weights; call `.eval()` before export.
    """
    _ensure_torchvision()
    from yolox.models import YoloPafpn, YoloxHead, YoloxModule

    backbone = YoloPafpn(
        NANO_DEPTH, NANO_WIDTH, in_channels=IN_CHANNELS, act="silu", depthwise=True
    )
    head = YoloxHead(
        num_classes,
        NANO_WIDTH,
        strides=STRIDES,
        in_channels=IN_CHANNELS,
        act="silu",
        depthwise=True,
    )
    model = YoloxModule(backbone, head)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = 1e-3
            module.momentum = 0.03
    model.head.initialize_biases(1e-2)
    model.train()
    return model
