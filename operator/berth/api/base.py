"""The ground the ModelDeployment API stands on: its group, version and kind, the patterns its fields
share (model uri schemes, DNS names, quantities) and `ApiModel`, the base of every model (camelCase on
the wire, unknown fields rejected, defaults validated)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "berth.dev"


VERSION = "v1alpha1"


API_VERSION = f"{GROUP}/{VERSION}"


KIND = "ModelDeployment"


PLURAL = "modeldeployments"


SINGULAR = "modeldeployment"


SHORT_NAMES = ["md"]


BUILTIN_MODEL = "builtin://smollm2-135m-instruct"


BUILTIN_MODELS = ("smollm2-135m-instruct",)


# One regular expression per model source; CEL in the CRD and pydantic here use the same strings.
URI_SCHEMES = ("builtin", "pvc", "hostpath", "hf")


URI_PATTERNS: dict[str, str] = {
    "builtin": r"^builtin://[a-z0-9][a-z0-9.-]*$",
    "pvc": r"^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?$",
    "hostpath": r"^hostpath:///.+$",
    "hf": r"^hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$",
}


URI_HELP = (
    "model.uri must be one of builtin://smollm2-135m-instruct, pvc://<claim>/<path>, "
    "hostpath:///<dir> or hf://<org>/<name>"
)


DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


Quantity = Annotated[
    str,
    Field(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$", max_length=32),
]


# A Kubernetes IntOrString ("25%" or 1): the CRD generator turns the marker into x-kubernetes-int-or-string.
IntOrPercent = Annotated[int | str, Field(json_schema_extra={"x-kubernetes-int-or-string": True})]


class ApiModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )
