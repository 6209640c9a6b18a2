"""mirror: a stateless, cluster-local OCI registry mirror."""

__version__ = "0.1.0"
