"""What the platform allows a ModelDeployment to ask for, beyond what its schema validates.

The schema (the CRD, from api/models.py) says what is well-formed; the policy says what this
installation permits, from the operator's settings. A violation is reported on the resource
(phase Failed, reason PolicyViolation, the field named) and no child is created or changed.
"""

from __future__ import annotations

from berth.api.models import ModelDeployment
from berth.controller.settings import OperatorSettings


class PolicyViolation(Exception):
    """A spec field this installation does not allow; ``field`` is its path (``spec.model.trustRemoteCode``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check(md: ModelDeployment, settings: OperatorSettings) -> None:
    """Raise PolicyViolation for the first field the operator's settings do not allow."""
    if md.spec.model.trust_remote_code and not settings.allow_remote_code:
        raise PolicyViolation(
            "spec.model.trustRemoteCode",
            "running a model repository's own code is not allowed on this platform "
            "(the operator setting BERTH_ALLOW_REMOTE_CODE is off)",
        )
