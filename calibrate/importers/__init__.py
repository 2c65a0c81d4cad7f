"""Importers: public GPU measurements (../shared/data/gpu_profiling) turned into moesim hardware profiles.

Each importer reads one source's files and returns a profile mapping in the format of ``sim.profile``
(``source: public-measurements``), with the source's provenance and licence in ``provenance``.

- ``aiconfigurator``: NVIDIA AIConfigurator's kernel database (H100 SXM, H200 SXM, A100 SXM)."""
