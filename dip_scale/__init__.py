"""dip_scale: train DiP (pixel-space diffusion with a Patch Detailer Head) at scale."""

__version__ = "0.1.0"
