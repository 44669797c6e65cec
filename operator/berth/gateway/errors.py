"""The gateway's own error answers: OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``),
and DashScope-shaped (``{"code", "message", "request_id"}``) on the DashScope route."""

from __future__ import annotations

import json
import uuid

from fastapi.responses import JSONResponse, Response, StreamingResponse

DASHSCOPE_PATH = "/api/v1/services/aigc/text-generation/generation"


def error(
    status: int, message: str, type_: str, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# The gateway's own error codes -> DashScope's, for errors answered on the DashScope route.
_DASHSCOPE_CODES = {
    "invalid_api_key": "InvalidApiKey",
    "model_not_found": "ModelNotFound",
    "requests_per_minute": "Throttling.RateQuota",
    "tokens_per_minute": "Throttling.AllocationQuota",
    "max_concurrent_requests": "Throttling",
    "no_ready_instance": "ServiceUnavailable",
    "wake_timeout": "ServiceUnavailable",
}


def dashscope_error_body(body: bytes) -> bytes:
    """An OpenAI-shaped error body of the gateway's in DashScope's shape (other bodies unchanged)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body
    err = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(err, dict):
        return body  # the instance's own answer: already DashScope's shape
    code = _DASHSCOPE_CODES.get(str(err.get("code")), "InvalidParameter")
    out = {"code": code, "message": err.get("message") or "", "request_id": str(uuid.uuid4())}
    return json.dumps(out).encode()


def as_dashscope(resp: Response) -> Response:
    if resp.status_code < 400 or isinstance(resp, StreamingResponse):
        return resp
    headers = {k: v for k, v in resp.headers.items() if k.lower() not in ("content-length", "content-type")}
    return Response(
        dashscope_error_body(bytes(resp.body)),
        status_code=resp.status_code,
        headers=headers,
        media_type="application/json",
    )


def not_found(model: str) -> JSONResponse:
    return error(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        "invalid_request_error",
        "model_not_found",
    )
