"""kopf handlers for ApiKeys: thin, like the ModelDeployment ones (parse, reconcile, translate errors).

A timer re-reconciles every minute so that an expiry shows in the Ready condition; the gateway does
not wait for it (it checks ``spec.expiresAt`` itself on every request).
"""

from __future__ import annotations

from typing import Any

import kopf
import pydantic

from berth.api.apikey import APIKEY_PLURAL
from berth.api.models import GROUP, VERSION
from berth.controller import kube
from berth.controller.apikeys import reconcile_apikey
from berth.controller.context import from_memo


def _run(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger) -> None:
    ctx = from_memo(memo)
    try:
        written = reconcile_apikey(dict(body), ctx.client)
    except pydantic.ValidationError as e:
        raise kopf.PermanentError(f"invalid ApiKey spec: {e.error_count()} error(s)") from None
    except kube.ApiError as e:
        raise kopf.TemporaryError(f"Kubernetes API: {e}", delay=5) from None
    if written:
        logger.info(
            "ApiKey status: keyId %s, Ready %s", written.get("keyId"), written["conditions"][0]["reason"]
        )


@kopf.on.resume(GROUP, VERSION, APIKEY_PLURAL)
@kopf.on.create(GROUP, VERSION, APIKEY_PLURAL)
@kopf.on.update(GROUP, VERSION, APIKEY_PLURAL, field="spec")
def on_apikey(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    _run(body, memo, logger)


@kopf.timer(GROUP, VERSION, APIKEY_PLURAL, interval=60, idle=30)
def on_apikey_timer(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    _run(body, memo, logger)
