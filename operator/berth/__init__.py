"""Berth: private model instances on Kubernetes."""

__version__ = "0.1.0"
