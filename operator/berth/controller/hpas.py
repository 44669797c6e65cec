"""HorizontalPodAutoscalers, which the built-in autoscaler stands aside for: their kind and which of
them target a ModelDeployment. The operator watches them into its cache (cache.operator_specs), so an
autoscaler tick reads them from memory rather than LISTing them every interval."""

from __future__ import annotations

from typing import Any

from berth.api.models import GROUP, KIND
from berth.controller import kube

HPA = kube.Kind("HorizontalPodAutoscaler", "apis/autoscaling/v2", "horizontalpodautoscalers")


def hpas_targeting(hpas: list[dict[str, Any]], name: str) -> list[str]:
    """Names of the HPAs (autoscaling/v2 objects of one namespace) whose scaleTargetRef is the
    ModelDeployment `name` (any berth.dev version), sorted."""
    found = []
    for hpa in hpas:
        ref = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
        group = str(ref.get("apiVersion") or "").partition("/")[0]
        if ref.get("kind") == KIND and ref.get("name") == name and group == GROUP:
            found.append(str((hpa.get("metadata") or {}).get("name")))
    return sorted(found)
