"""Errors of the serving layer: one ``ApiError`` with an HTTP status, rendered by the routes in
OpenAI's (or TGI's) error shape, and the constructors for the errors several places raise."""

from __future__ import annotations

from berth.server.engine.types import AdapterNotFoundError, EngineDrainingError, ParamError, QueueFullError


class ApiError(Exception):
    """An error with an HTTP status, rendered in OpenAI's (or TGI's) error shape by the routes."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}


def bad_param(param: str, message: str) -> ApiError:
    """400 naming the request field that is wrong."""
    return ApiError(400, message, param=param, code="invalid_parameter")


def draining() -> ApiError:
    """503 once the server stopped admitting requests (SIGTERM): the engine and the app raise it."""
    return ApiError(
        503,
        "The server is shutting down and no longer accepts requests",
        type_="service_unavailable",
        code="draining",
        headers={"Retry-After": "1"},
    )


def not_ready(phase: str) -> ApiError:
    return ApiError(
        503,
        f"The model is not ready ({phase})",
        type_="service_unavailable",
        code="not_ready",
        headers={"Retry-After": "5"},
    )


def aborted() -> ApiError:
    """A generation the engine stopped before it finished (a drain timeout, the engine stopping)."""
    return ApiError(
        503,
        "the generation was stopped before it finished (the server is shutting down)",
        type_="server_error",
        code="aborted",
        headers={"Retry-After": "1"},
    )


def internal(exc: BaseException) -> ApiError:
    return ApiError(500, f"generation failed: {exc}", type_="server_error", code="internal_error")


def from_engine(exc: BaseException, prompt_param: str) -> ApiError:
    """The ApiError for an exception the engine raised when a request was submitted."""
    if isinstance(exc, QueueFullError):
        retry = max(1, round(exc.retry_after))
        return ApiError(
            429,
            f"The server is at capacity: {exc}. Retry after {retry} s.",
            type_="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(retry)},
        )
    if isinstance(exc, EngineDrainingError):
        return draining()
    if isinstance(exc, AdapterNotFoundError):
        return ApiError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, ParamError):  # e.g. a response_format grammar that does not compile
        return bad_param(exc.param, str(exc))
    if isinstance(exc, ValueError):
        return bad_param(prompt_param, str(exc))
    return internal(exc)
