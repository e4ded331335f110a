"""The adapter registry: names, versions and visibility over the on-disk store and the engine's pool.

Naming: adapter names are per tenant. `resolve(t, "foo")` is tenant t's own "foo", else a *shared*
"foo" of another tenant: when several tenants share a "foo", the one that has been shared the longest
without a break (the oldest version of its newest run of shared versions; ties by owner name), so a name
that works keeps working when another tenant later shares the same name. `resolve(t, "owner/foo")` is
that tenant's "foo", allowed when owner == t, the adapter is shared, or t is an admin. Writes name a
tenant that exists: the tenant name rule is server.tenants' and, given `known_tenants`, the tenant is in
the tenants file. The pool key of a version is
`tenant/name@version`: a new version serves new requests while running sequences keep theirs.
Every version stays registered in the pool (on disk, loaded on demand) until the adapter is deleted,
so a key handed out by `resolve` stays usable while a newer version is uploaded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from server.adapters.errors import AdapterForbidden, AdapterNotFound, AdapterRejected, WrongBaseModel
from server.adapters.peft_format import AdapterFormatError, BaseModelMismatch
from server.adapters.pool import AdapterMeta, AdapterPool
from server.adapters.store import AdapterStore, StoredVersion, StoreError, check_name
from server.adapters.weights import AdapterWeights
from server.clip import clip
from server.tenants import check_tenant_name

__all__ = ["AdapterForbidden", "AdapterInfo", "AdapterNotFound", "AdapterRegistry", "AdapterRejected",
           "ResolvedAdapter", "WrongBaseModel", "pool_key"]

Validator = Callable[[Path], AdapterWeights]


def pool_key(tenant: str, name: str, version: int) -> str:
    return f"{tenant}/{name}@{version}"


@dataclass(frozen=True, slots=True)
class ResolvedAdapter:
    pool_key: str
    name: str
    version: int
    tenant: str
    shared: bool = False  # the version's visibility to other tenants (metrics never label private ones)


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    name: str
    tenant: str
    version: int  # the newest
    versions: tuple[int, ...]
    kind: str  # the adapter kind's name (a kind registered in server/adapters/kinds/__init__.py)
    rank: int  # LoRA rank; 0 for other kinds
    target_modules: tuple[str, ...]
    size_bytes: int  # files of the newest version
    created_at: float  # unix seconds, newest version
    shared: bool
    residency: str  # where the newest version is: "disk" | "host" | "device"
    num_virtual_tokens: int = 0


def _who(tenant) -> tuple[str, bool | None]:
    """A tenant name, or any object with .name and .is_admin (server.tenants.Tenant)."""
    if isinstance(tenant, str):
        return tenant, None
    return tenant.name, bool(tenant.is_admin)


class AdapterRegistry:
    """Thread-safe. Writers of one adapter name are serialized; readers never wait on disk I/O."""

    def __init__(self, store: AdapterStore, pool: AdapterPool, validate: Validator, *,
                 admin_tenants: frozenset[str] = frozenset({"admin"}),
                 known_tenants: frozenset[str] | None = None) -> None:
        self.known_tenants = known_tenants  # None = any validly named tenant may own adapters
        self.store = store
        self.pool = pool
        self.validate = validate
        self.admin_tenants = admin_tenants
        self._lock = threading.Lock()  # guards _visible and _write_locks
        self._write_locks: dict[tuple[str, str], threading.Lock] = {}
        self._visible: dict[tuple[str, str], list[StoredVersion]] = {}
        for tenant, name in store.names():
            versions = store.versions(tenant, name)
            newest = versions[-1]
            self._register(newest)
            self._visible[(tenant, name)] = versions

    # ---- naming and visibility -----------------------------------------------------------------
    def _is_admin(self, tenant) -> bool:
        name, is_admin = _who(tenant)
        return is_admin if is_admin is not None else name in self.admin_tenants

    def _find(self, tenant, name: str) -> tuple[str, str, list[StoredVersion]]:
        """(owner, name, versions) that `name` means for `tenant`; raises NotFound / Forbidden."""
        me, _ = _who(tenant)
        if not isinstance(name, str) or not name:
            raise AdapterNotFound("no adapter name given")
        with self._lock:
            if "/" in name:
                owner, _, short = name.partition("/")
                versions = self._visible.get((owner, short))
                if not versions:
                    raise AdapterNotFound(f"adapter {clip(name)} not found")
                if owner != me and not versions[-1].shared and not self._is_admin(tenant):
                    raise AdapterForbidden(f"adapter {clip(name)} belongs to tenant {clip(owner)} and is not shared")
                return owner, short, list(versions)
            own = self._visible.get((me, name))
            if own:
                return me, name, list(own)
            shared = sorted((_shared_since(v), owner) for (owner, n), v in self._visible.items()
                            if n == name and v and v[-1].shared)
        if not shared:
            raise AdapterNotFound(f"adapter {clip(name)} not found")
        return self._find(tenant, f"{shared[0][1]}/{name}")

    def _owned(self, tenant, name: str) -> tuple[str, str]:
        """The (owner, name) a write addresses: own names, or `owner/name` for admins."""
        me, _ = _who(tenant)
        owner, short = (name.partition("/")[0], name.partition("/")[2]) if "/" in name else (me, name)
        if owner != me and not self._is_admin(tenant):
            raise AdapterForbidden(f"tenant {clip(me)} may not write adapters of tenant {clip(owner)}")
        try:
            check_tenant_name(owner)
            check_name("adapter", short)
        except ValueError as exc:
            raise AdapterRejected(str(exc)) from None
        if self.known_tenants is not None and owner not in self.known_tenants:
            raise AdapterRejected(f"there is no tenant {clip(owner)} in the tenants file")
        return owner, short

    def resolve(self, tenant, name: str) -> ResolvedAdapter:
        """The newest version of `name` visible to `tenant` (pinned by its pool key)."""
        owner, short, versions = self._find(tenant, name)
        newest = versions[-1]
        return ResolvedAdapter(pool_key(owner, short, newest.version), short, newest.version, owner, newest.shared)

    def get(self, tenant, name: str) -> AdapterInfo:
        return self._info(self._find(tenant, name)[2])

    def list(self, tenant=None) -> list[AdapterInfo]:
        """Adapters visible to `tenant` (its own and shared ones; all of them for None or an admin)."""
        me, _ = _who(tenant) if tenant is not None else (None, None)
        see_all = tenant is None or self._is_admin(tenant)
        with self._lock:
            found = [v for (owner, _), v in sorted(self._visible.items())
                     if v and (see_all or owner == me or v[-1].shared)]
        return [self._info(v) for v in found]

    def version_dir(self, tenant, name: str) -> tuple[ResolvedAdapter, Path]:
        """The newest visible version and its directory (read-only use, e.g. merging)."""
        owner, short, versions = self._find(tenant, name)
        newest = versions[-1]
        return ResolvedAdapter(pool_key(owner, short, newest.version), short, newest.version, owner), newest.path

    def read(self, tenant, name: str) -> tuple[ResolvedAdapter, AdapterWeights]:
        """The newest visible version, read from disk (sha256-checked, validated): e.g. to merge it."""
        owner, short, versions = self._find(tenant, name)
        newest = versions[-1]
        try:
            weights = self._load(newest)
        except (StoreError, AdapterFormatError) as exc:
            raise AdapterRejected(f"stored adapter {owner}/{short}@{newest.version} is unreadable: {exc}") from None
        return ResolvedAdapter(pool_key(owner, short, newest.version), short, newest.version, owner), weights

    # ---- writes --------------------------------------------------------------------------------
    def create(self, tenant, name: str, src_dir: Path, *, shared: bool = False) -> AdapterInfo:
        """Validate `src_dir` against the base, store it as a new version, make it the one served."""
        owner, short = self._owned(tenant, name)
        weights = self._validate(Path(src_dir))
        with self._write_lock(owner, short):
            try:
                stored = self.store.put(owner, short, Path(src_dir), shared=shared, meta=weights.describe())
            except (StoreError, OSError) as exc:
                raise StoreError(f"storing adapter {owner}/{short} failed: {exc}") from exc
            self._register(stored, weights)
            with self._lock:
                self._visible.setdefault((owner, short), []).append(stored)
                versions = list(self._visible[(owner, short)])
        return self._info(versions)

    def delete(self, tenant, name: str) -> None:
        """New requests get AdapterNotFound at once; sequences already holding a version finish on it."""
        owner, short = self._owned(tenant, name)
        with self._write_lock(owner, short):
            with self._lock:
                versions = self._visible.pop((owner, short), None)
            if not versions:
                raise AdapterNotFound(f"adapter {clip(name)} not found")
            for stored in versions:
                self.pool.unregister(pool_key(owner, short, stored.version))
            self.store.delete(owner, short)

    # ---- helpers -------------------------------------------------------------------------------
    def _write_lock(self, owner: str, name: str) -> threading.Lock:
        with self._lock:
            return self._write_locks.setdefault((owner, name), threading.Lock())

    def _validate(self, path: Path) -> AdapterWeights:
        try:
            return self.validate(path)
        except BaseModelMismatch as exc:
            raise WrongBaseModel(f"the adapter does not fit the loaded base model: {exc}") from None
        except AdapterFormatError as exc:
            raise AdapterRejected(str(exc)) from None

    def _load(self, stored: StoredVersion) -> AdapterWeights:
        """The pool's reader for a stored version: sha256 check, then the usual validation."""
        self.store.verify(stored)
        return self.validate(stored.path)

    def _register(self, stored: StoredVersion, weights: AdapterWeights | None = None) -> None:
        meta = AdapterMeta.stored(stored.meta)
        key = pool_key(stored.tenant, stored.name, stored.version)
        self.pool.register(key, lambda s=stored: self._load(s), stored.version, meta=meta, weights=weights,
                           digest=stored.content_digest, shared=stored.shared)

    def _info(self, versions: list[StoredVersion]) -> AdapterInfo:
        newest = versions[-1]
        meta = newest.meta
        return AdapterInfo(
            name=newest.name, tenant=newest.tenant, version=newest.version,
            versions=tuple(v.version for v in versions), kind=meta.get("kind", ""), rank=int(meta.get("rank", 0)),
            target_modules=tuple(meta.get("target_modules", ())), size_bytes=newest.size_bytes,
            created_at=newest.created_at, shared=newest.shared,
            residency=self.pool.residency(pool_key(newest.tenant, newest.name, newest.version)),
            num_virtual_tokens=int(meta.get("num_virtual_tokens", 0)),
        )


def _shared_since(versions: list[StoredVersion]) -> float:
    """When the newest run of shared versions began (created_at of its oldest version)."""
    since = versions[-1].created_at
    for v in reversed(versions):
        if not v.shared:
            break
        since = v.created_at
    return since


def open_registry(data_dir: Path, pool: AdapterPool, *, admin_tenants: frozenset[str] = frozenset({"admin"}),
                  known_tenants: frozenset[str] | None = None) -> AdapterRegistry:
    """The registry over `data_dir/adapters`, validating with the pool's reader (the loaded base's checks)."""
    if pool.reader is None:
        raise ValueError("the pool has no adapter reader")
    return AdapterRegistry(AdapterStore(Path(data_dir) / "adapters"), pool, pool.reader, admin_tenants=admin_tenants,
                           known_tenants=known_tenants)
