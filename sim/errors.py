"""Every error a user can fix, in one tree.

    MoesimError                 base: the CLI prints it as one line and exits 2
    ├── ScenarioError           a scenario YAML is malformed or impossible (names file + key path)
    ├── CatalogError            unknown model name or invalid model spec
    ├── ProfileError            a hardware profile is missing, malformed or lacks an operation
    ├── TraceError              an arrival or routing trace has a broken row (names file + line)
    ├── PolicyError             a policy returned an invalid decision
    └── CapacityError           the configuration cannot hold the model or even one request

Foreign errors (pydantic, yaml, OSError) are translated at the boundary with ``raise ... from``."""


class MoesimError(Exception):
    """Base of every user-fixable error."""


class ScenarioError(MoesimError):
    """A scenario file is malformed, has unknown keys or impossible values."""


class CatalogError(MoesimError):
    """An unknown model name or an invalid model spec."""


class ProfileError(MoesimError):
    """A hardware profile is missing, malformed, or has no fit for an operation."""


class TraceError(MoesimError):
    """An arrival or routing trace cannot be read; the message names file and line."""


class PolicyError(MoesimError):
    """A policy returned a decision the engine cannot carry out."""


class CapacityError(MoesimError):
    """The configuration cannot hold the model weights or even a single request."""
