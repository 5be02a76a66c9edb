"""EquiDEQ engine: deep equilibrium reconstruction trained by Equivariant Imaging.

Pure PyTorch + deepinv; never imports Qt. Reports through event observers
(:mod:`engine.events`).
"""

__version__ = "0.1.0"
