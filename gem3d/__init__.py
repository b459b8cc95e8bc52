"""gem3d: generative enhancement of 3D medical image datasets (a reproduction of GEM-3D)."""

__version__ = "0.1.0"
