"""Pouch: a container runtime for Kubernetes nodes (CRI v1 over gRPC)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pouch")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
