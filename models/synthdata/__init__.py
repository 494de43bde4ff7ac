"""Synthetic detection data: procedurally drawn shapes over photos and textures, as COCO.

Classes, knobs and commands: see README.md beside this file. Build-time only (scikit-image).
"""

from .clip import render_clip, render_stills
from .dataset import SynthDataError, generate, image_rng
from .scene import SceneConfig, render_jpeg
from .shapes import CLASS_NAMES

__all__ = [
    "CLASS_NAMES",
    "SceneConfig",
    "SynthDataError",
    "generate",
    "image_rng",
    "render_clip",
    "render_jpeg",
    "render_stills",
]
