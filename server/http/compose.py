"""The HTTP body's `adapters` composition -> the engine's parts, each resolved like `model` (server/compose_api.py).

With `adapters`, `model` is the base model (its id or "base") or left out, and `adapter` is not set.
"""

from __future__ import annotations

from server.adapters.errors import AdapterForbidden, AdapterNotFound
from server.compose_api import ResolvedParts, resolve_parts
from server.engine.request import InvalidRequest
from server.http import schemas
from server.http.errors import NOT_FOUND, ApiError, from_exception, invalid

BASE_ALIASES = ("base", "")


def resolve_http_parts(registry, tenant, parsed: schemas.ParsedRequest, model_id: str, limit: int) -> ResolvedParts:
    if parsed.adapter is not None:
        raise invalid("set 'adapter' or 'adapters', not both (a single adapter may be one entry of 'adapters')",
                      "adapter")
    if parsed.model not in (model_id, *BASE_ALIASES, "+".join(a.name for a in parsed.adapters)):
        raise invalid("with 'adapters', 'model' must be the base model (its id or 'base') or left out",
                      "model")
    if registry is None:
        raise ApiError(NOT_FOUND, "adapters do not exist (this server has no adapter store)", "adapters")
    try:
        return resolve_parts(registry, tenant, list(parsed.adapters), limit)
    except InvalidRequest as exc:
        raise invalid(str(exc), "adapters") from None
    except (AdapterNotFound, AdapterForbidden) as exc:
        error = from_exception(exc)
        raise ApiError(error.kind, f"an adapter of 'adapters' is not available: {error.message}", "adapters"
                       ) from None
