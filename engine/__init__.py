"""EquiDEQ engine: deep equilibrium reconstruction trained by Equivariant Imaging.

Pure PyTorch + deepinv; never imports Qt. Reports through event observers
(:mod:`engine.events`).
"""

from engine.resources import DIST_NAME, checkout_project


def _version() -> str:
    """``[project] version`` of pyproject.toml, the one place it is written.

    From a source checkout the file itself is read (an editable install's metadata is only as new as
    its last ``pip install``); an installed wheel or a frozen bundle reads the distribution's metadata,
    which the build copied from the same field.
    """
    project = checkout_project()
    if project is not None and project.get("version"):
        return str(project["version"])
    from importlib import metadata

    try:
        return metadata.version(DIST_NAME)
    except metadata.PackageNotFoundError:
        return "0+unknown"  # neither a checkout nor an installed distribution: a copied source tree


__version__ = _version()
