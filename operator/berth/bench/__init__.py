"""``berth bench``: a load generator for OpenAI-compatible endpoints with vLLM's serving metrics."""

from __future__ import annotations

from berth.bench.main import main

__all__ = ["main"]
