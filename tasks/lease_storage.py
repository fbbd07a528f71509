"""The concurrency lease storage of the Prefect server `cogpipe serve` starts (Prefect's own
file storage, in a folder beside the server's database) and the reconciliation of the GPU
slots with it.

Prefect 3.8 keeps the leases of global concurrency limits in the server's memory by default
(`prefect.server.concurrency.lease_storage.memory`) while the slots they count
(`active_slots`) live in the database: a restarted server forgets every lease, so a slot
held when it stopped is never freed (its repossessor only revokes leases it knows), and a
run still renewing a forgotten lease is told 410 Gone and, with `strict=True`, terminated.
Prefect's file storage keeps the leases on disk: across a restart a live run keeps its slot,
and a dead run's lease expires a minute after its last renewal (cogpipe_tasks.gpu.LEASE_S)
and is revoked. Slots taken under a server that kept its leases in memory are freed by
reconcile_gpu_slots when `cogpipe serve` starts.

    PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=cogpipe_tasks.lease_storage
    COGPIPE_LEASE_DIR=/path/to/prefect.db.leases      # both set by `cogpipe serve`

The folder must belong to one database: a server's repossessor revokes every expired lease
in it, decrementing its own database only, so two servers sharing a folder would lose each
other's slots (Prefect's default folder, PREFECT_HOME/concurrency_leases, is shared by
every database under that home).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from uuid import UUID

from prefect.server.concurrency.lease_storage import filesystem
from prefect.settings import get_current_settings
from prefect.utilities.asyncutils import run_coro_as_sync
from sqlalchemy.engine import make_url

from cogpipe.compat import lease_expiration_index

LEASE_DIR_ENV = "COGPIPE_LEASE_DIR"
LEASE_STORAGE = __name__  # the server's setting: this module
MEMORY_LEASES = "prefect.server.concurrency.lease_storage.memory"  # Prefect's default


class ConcurrencyLeaseStorage(filesystem.ConcurrencyLeaseStorage):
    """Prefect's file lease storage in $COGPIPE_LEASE_DIR (Prefect's default folder when
    unset); the server instantiates it with no arguments."""

    def __init__(self, storage_path: Path | None = None):
        folder = os.environ.get(LEASE_DIR_ENV)
        super().__init__(storage_path or (Path(folder) if folder else None))

    async def lease_ids(self) -> list[UUID]:
        """Every lease the server knows, expired ones included (one read of the index its
        repossessor scans: a lease missing from it is never revoked, so it holds nothing)."""
        return [UUID(key) for key in await lease_expiration_index(self)]


def leased_slots(folder: Path) -> dict[UUID, int]:
    """{limit id: slots} held by the leases stored in `folder` (expired ones included: the
    server's repossessor frees those itself)."""
    return run_coro_as_sync(_leased_slots(ConcurrencyLeaseStorage(folder)))


async def _leased_slots(storage: ConcurrencyLeaseStorage) -> dict[UUID, int]:
    held: Counter[UUID] = Counter()
    for lease_id in await storage.lease_ids():
        lease = await storage.read_lease(lease_id)
        if lease is not None and lease.metadata is not None:
            for limit_id in lease.resource_ids:
                held[limit_id] += lease.metadata.slots
    return dict(held)


def lease_dir(database: Path | None = None) -> Path:
    """The lease folder of a server on `database` (default: Prefect's configured one):
    `<file>.leases` beside a SQLite file, so each database has its own; PREFECT_HOME's
    `concurrency_leases` for another database."""
    settings = get_current_settings()
    if database is None:
        url = make_url(settings.server.database.connection_url.get_secret_value())
        if not url.drivername.startswith("sqlite") or url.database in (None, "", ":memory:"):
            return settings.home / "concurrency_leases"
        database = Path(url.database)
    return database.with_name(database.name + ".leases")


def lease_env(database: Path | None = None) -> tuple[dict[str, str], Path | None]:
    """The server's lease storage settings and the folder this process can reconcile
    against: cogpipe's on-disk storage unless another one than Prefect's in-memory
    default is configured (e.g. prefect-redis), which is kept and not reconciled."""
    configured = get_current_settings().server.concurrency.lease_storage
    if configured not in (MEMORY_LEASES, LEASE_STORAGE):
        return {}, None
    folder = lease_dir(database)
    env = {"PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE, LEASE_DIR_ENV: str(folder)}
    return env, folder


def reconcile_gpu_slots(client, leases: Path, settle_s: float = 0.5) -> dict[str, int]:
    """Free the GPU slots (`gpu:*` limits) that the database counts but no lease in the
    server's lease storage (the folder `leases`) holds: slots taken under a server that kept
    its leases in memory and forgot them when it stopped, which nothing else would free.

    A slot a live run holds has its lease stored, so it is kept, on any worker. Each limit's
    count is read before and after the leases (`settle_s` apart); a limit whose count
    changed meanwhile (a slot was taken or freed) is left alone. Returns {limit: slots freed}.
    """
    before = {lim.name: lim for lim in _gpu_limits(client)}
    time.sleep(settle_s)  # a slot being taken reaches the storage just after the database
    held = leased_slots(leases)
    time.sleep(settle_s)  # a slot being freed leaves the storage just before the database
    freed = {}
    for limit in _gpu_limits(client):
        extra = limit.active_slots - held.get(limit.id, 0)
        old = before.get(limit.name)
        if extra > 0 and old is not None and old.active_slots == limit.active_slots:
            # occupancy unknown: None leaves the limit's average occupancy as it is
            client.release_concurrency_slots([limit.name], extra, occupancy_seconds=None)
            freed[limit.name] = extra
    return freed


def _gpu_limits(client) -> list:
    """Every `gpu:*` global concurrency limit of the server."""
    found, page = [], 200
    while batch := client.read_global_concurrency_limits(limit=page, offset=len(found)):
        found.extend(batch)
        if len(batch) < page:
            break
    return [lim for lim in found if lim.name.startswith("gpu:")]
