"""Stand-in for the few `torchvision` names pixeltable-yolox imports (NMS only).

Build-time only: `models.scripts.yolox_arch` puts this on sys.path when the real
torchvision does not import. Not a general torchvision replacement.
"""

from . import ops

__all__ = ["ops"]
__version__ = "0.0.0+edge-agent-shim"
