"""API keys -> tenants, and per-tenant concurrency limits.

The tenants file (TOML) stores only sha256 hashes of keys:

    [tenants.admin]                      # the tenant named "admin" has admin rights
    key_sha256 = "9f86d081884c7d65..."   # a hex digest, or a list of them (key rotation)

    [tenants.acme]
    key_sha256 = ["3a7bd3e2360a3d29...", "..."]
    max_concurrent = 16                  # optional; default ServerConfig.per_tenant_concurrency
    weight = 2.0                         # optional: VTC share, and quotas (server/quotas.py):
    tokens_per_minute = 20000            #   tokens_per_minute, requests_per_minute, max_adapters, max_adapter_bytes

`python -m server.tenants hash KEY` prints the digest of a key. Without a tenants file (loopback
only) every caller is the single tenant "local", with admin rights, and no key is needed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import stat
import sys
import threading
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from server.clip import clip
from server.quotas import LIMIT_FIELDS, TenantLimits, parse_limits

log = logging.getLogger(__name__)

ADMIN_TENANT = "admin"
LOCAL_TENANT = "local"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")  # THE tenant name rule: tenants file, CLI, registry
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def check_tenant_name(name: object) -> str:
    """`name` if it is a valid tenant name (1-64 of a-z 0-9 _ -, starting with a letter or digit); else ValueError."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"tenant name {clip(name)} is not allowed: use 1-64 characters from a-z 0-9 _ -, "
                         "starting with a letter or digit")
    return name


class TenantsFileError(ValueError):
    """The tenants file is malformed (raised at start-up, with the offending entry named)."""


class Unauthenticated(Exception):
    """No key, a malformed header, or a key no tenant holds."""


class TenantPermissionDenied(PermissionError):
    """A non-admin tenant named another tenant."""


class TenantBusy(RuntimeError):
    """The tenant has its maximum of concurrent requests in flight."""


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    is_admin: bool = False
    max_concurrent: int | None = None  # None = the server default
    limits: TenantLimits = TenantLimits()  # VTC weight and quotas (server/quotas.py)

    def act_as(self, requested: str) -> str:
        """The tenant a call acts on: the caller's own unless `requested` names another (admin only)."""
        if not requested or requested == self.name:
            return self.name
        if not self.is_admin:
            raise TenantPermissionDenied(
                f"tenant {self.name!r} may not act on tenant {clip(requested)}; only the admin tenant may"
            )
        if not _NAME.match(requested):
            raise TenantPermissionDenied(f"{clip(requested)} is not a valid tenant name")
        return requested


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return "sb-" + secrets.token_urlsafe(24)


class TenantDirectory:
    """Who is calling: maps the `authorization: Bearer <key>` header to a Tenant."""

    def __init__(self, by_digest: dict[str, Tenant] | None) -> None:
        self._by_digest = by_digest  # None = open loopback mode (single local tenant)
        self.tenants = sorted({t.name for t in (by_digest or {}).values()}) or [LOCAL_TENANT]
        self._by_name = {t.name: t for t in (by_digest or {}).values()}

    def by_name(self, name: str) -> Tenant | None:
        return self._by_name.get(name)

    def weights(self) -> dict[str, float]:
        return {name: t.limits.weight for name, t in self._by_name.items()}

    def replace_with(self, other: TenantDirectory) -> None:
        """Take `other`'s tenants (a reload): calls authenticated from now on see them; running ones keep theirs."""
        if self.open != other.open:
            raise TenantsFileError("a reload cannot switch between open (no tenants file) and keyed mode")
        self._by_digest, self.tenants, self._by_name = other._by_digest, other.tenants, other._by_name

    @property
    def open(self) -> bool:
        return self._by_digest is None

    @classmethod
    def local(cls) -> TenantDirectory:
        return cls(None)

    @classmethod
    def from_mapping(cls, data: dict) -> TenantDirectory:
        """Build from the parsed TOML (`{"tenants": {name: {"key_sha256": ..., ...}}}`)."""
        tenants = data.get("tenants")
        if not isinstance(tenants, dict) or not tenants:
            raise TenantsFileError("the tenants file needs at least one [tenants.<name>] table")
        unknown = set(data) - {"tenants"}
        if unknown:
            raise TenantsFileError(f"unknown top-level keys {sorted(unknown)}")
        by_digest: dict[str, Tenant] = {}
        for name, entry in tenants.items():
            if not _NAME.match(name):
                raise TenantsFileError(f"tenant name {clip(name)} must match {_NAME.pattern}")
            if not isinstance(entry, dict):
                raise TenantsFileError(f"[tenants.{name}] must be a table")
            extra = set(entry) - {"key_sha256", "max_concurrent", "weight", *LIMIT_FIELDS}
            if extra:
                raise TenantsFileError(f"[tenants.{name}] has unknown keys {sorted(extra)}")
            digests = entry.get("key_sha256")
            digests = [digests] if isinstance(digests, str) else digests
            if not digests or not isinstance(digests, list):
                raise TenantsFileError(f"[tenants.{name}] needs key_sha256 (a hex digest or a list of them)")
            limit = entry.get("max_concurrent")
            if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
                raise TenantsFileError(f"[tenants.{name}] max_concurrent must be an integer >= 1")
            try:
                limits = parse_limits(f"tenants.{name}", entry)
            except ValueError as exc:
                raise TenantsFileError(str(exc)) from None
            tenant = Tenant(name, is_admin=name == ADMIN_TENANT, max_concurrent=limit, limits=limits)
            for digest in digests:
                digest = str(digest).lower()
                if not _DIGEST.match(digest):
                    raise TenantsFileError(f"[tenants.{name}] key_sha256 {digest!r} is not a sha256 hex digest")
                if digest in by_digest:
                    raise TenantsFileError(f"a key is given to both {by_digest[digest].name!r} and {name!r}")
                by_digest[digest] = tenant
        return cls(by_digest)

    @classmethod
    def from_file(cls, path: Path) -> TenantDirectory:
        warn_if_readable(Path(path), "the tenants file (key hashes and quotas)")
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise TenantsFileError(f"cannot read tenants file {path}: {exc}") from exc
        return cls.from_mapping(data)

    def authenticate(self, metadata: tuple | list | None) -> Tenant:
        """The caller's tenant from gRPC invocation metadata; raises Unauthenticated."""
        if self._by_digest is None:
            return Tenant(LOCAL_TENANT, is_admin=True)
        headers = [v for k, v in metadata or () if k == "authorization"]
        if not headers:
            raise Unauthenticated("missing `authorization: Bearer <api key>` metadata")
        if len(headers) > 1:  # which one would win is a proxy's choice, not ours: refuse the ambiguity
            raise Unauthenticated(f"{len(headers)} authorization headers; send exactly one")
        header = headers[0]
        if isinstance(header, bytes):
            header = header.decode("utf-8", "replace")
        scheme, _, key = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("the authorization metadata must be `Bearer <api key>`")
        digest = hash_key(key.strip())
        tenant = self._by_digest.get(digest)
        # the lookup is keyed by a hash of the key: timing reveals nothing about the stored keys
        if tenant is None:
            raise Unauthenticated("invalid API key")
        return tenant


class ConcurrencyLimiter:
    """At most `limit` requests in flight per tenant (the tenant's own `max_concurrent` wins)."""

    def __init__(self, default_limit: int) -> None:
        self.default_limit = default_limit
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()

    def in_flight(self, tenant: str) -> int:
        with self._lock:
            return self._in_flight.get(tenant, 0)

    @contextmanager
    def hold(self, tenant: Tenant):
        """One of the tenant's concurrent requests for the duration of the block; TenantBusy when at its limit."""
        limit = tenant.max_concurrent or self.default_limit
        with self._lock:
            n = self._in_flight.get(tenant.name, 0)
            if n >= limit:
                raise TenantBusy(
                    f"tenant {tenant.name!r} already has {n} requests in flight (limit {limit}); retry later"
                )
            self._in_flight[tenant.name] = n + 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight[tenant.name] -= 1


def write_tenants_file(path: Path, keys: dict[str, str], limits: dict[str, int] | None = None) -> Path:
    """Write a tenants file for plain keys {tenant: key} (used by tests and `python -m server.tenants new`)."""
    lines = []
    for name, key in keys.items():
        check_tenant_name(name)
        lines += [f"[tenants.{name}]", f'key_sha256 = "{hash_key(key)}"']
        if limits and name in limits:
            lines.append(f"max_concurrent = {limits[name]}")
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def tenants_toml(keys: dict[str, str]) -> str:
    """The TOML of a tenants file for plain keys {tenant: key}; names are checked (ValueError)."""
    blocks = []
    for name, key in keys.items():
        check_tenant_name(name)  # a valid name is also a bare TOML key: no quoting needed
        blocks.append(f'[tenants.{name}]\nkey_sha256 = "{hash_key(key)}"\n')
    return "\n".join(blocks)


def _parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m server.tenants",
                                description="Print a tenants file (TOML) for new tenants, or hash a key.")
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hash", help="print the sha256 digest of an API key")
    h.add_argument("key")
    n = sub.add_parser("new", help="print a tenants file for fresh keys (the keys go to stderr)")
    n.add_argument("names", nargs="+", metavar="TENANT", help="tenant names (a-z 0-9 _ -; 'admin' has admin rights)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "hash":
        print(hash_key(args.key))
        return 0
    if len(set(args.names)) != len(args.names):
        print("error: a tenant name is given twice", file=sys.stderr)
        return 2
    try:
        for name in args.names:
            check_tenant_name(name)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    keys = {name: new_key() for name in args.names}
    for name, key in keys.items():
        print(f"# {name}: {key}", file=sys.stderr)
    print(tenants_toml(keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def warn_if_readable(path: Path, what: str) -> bool:
    """Log a warning (and return True) when `path` is readable by its group or by others: keep it 0600."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False  # reading it reports the problem
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s %s is accessible to its group or others (mode %o); chmod 600 it", what, path,
                    stat.S_IMODE(mode))
        return True
    return False
