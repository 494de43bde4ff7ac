"""The diffusion family: optimum Stable-Diffusion layout, numpy schedulers, adapter conditions,
and the text encoder -> UNet loop -> VAE pipeline (pipeline.py) on any runtime.
"""
