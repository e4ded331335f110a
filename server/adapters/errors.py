"""Adapter errors shared by the registry, the pool and the engine; each maps to one gRPC status."""

from __future__ import annotations


class AdapterNotFound(LookupError):
    """No adapter of that name is visible to the caller (NOT_FOUND)."""


class AdapterForbidden(PermissionError):
    """The adapter exists but belongs to another tenant and is not shared (PERMISSION_DENIED)."""


class AdapterRejected(ValueError):
    """The adapter or its name is not acceptable: bad format, shapes, NaN, rank ... (INVALID_ARGUMENT)."""


class WrongBaseModel(AdapterRejected):
    """The adapter was made for another base model: hidden size, layer count, KV shape (FAILED_PRECONDITION)."""
