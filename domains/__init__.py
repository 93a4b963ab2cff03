"""Domain adapters that ship with polydiff: audio waveforms, 3-D molecules and images.

Each adapter is registered lazily by name in :mod:`polydiff.registry`
(``"audio"``, ``"molecule"``, ``"image"``) and imported on first use.
"""
