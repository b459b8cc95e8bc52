"""gem3d: generative enhancement of 3D medical image datasets (a reproduction of GEM-3D)."""

__version__ = "0.1.0"


def version() -> str:
    """The installed distribution's version; __version__ when run from a source tree."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("gem3d")
    except PackageNotFoundError:
        return __version__
