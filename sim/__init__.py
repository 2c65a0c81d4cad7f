"""moesim's simulator: scenario language, model catalog, hardware profiles and the SimPy engine.

This package never imports torch or ``calibrate``; it defines the formats that ``calibrate`` writes."""

__version__ = "0.1.0"
