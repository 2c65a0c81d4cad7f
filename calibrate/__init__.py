"""moesim's calibrator: measures real kernels and transfers and writes hardware profiles in sim's format.

Imports torch; never imported by ``sim``."""
