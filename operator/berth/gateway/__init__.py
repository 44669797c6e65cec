"""`berth gateway`: one OpenAI-compatible endpoint for every instance.

Layers: main -> app (HTTP) -> proxy (upstream relay) -> registry, balancer, quota, usage (pure state);
kube (watches and status flushes) feeds the registry and is wired in by main only.
"""
