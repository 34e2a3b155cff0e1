"""What the routes ask of the daemon: the `Service` protocol.

The routes depend on this protocol, not on the daemon's implementation
(criud.daemon.service.CriudService), so api/ imports nothing that runs
criu, and a test can put a stand-in behind the real app.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

from criud.daemon.caller import Caller
from criud.daemon.handles import FdHandle
from criud.daemon.operations import Operation
from criud.daemon.store import CheckpointRecord, RestoreRecord
from criud.dump.inspect import Tree
from criud.dump.job import CheckpointSpec
from criud.dump.preflight import Report
from criud.restore.job import RestoreSpec

if TYPE_CHECKING:
    # Types only: archives and migrations load on their first request.
    from criud.daemon.archive import Export
    from criud.dump.migrate import MigrationResult, MigrationSpec


class Service(Protocol):
    """Everything the API can ask of the daemon; one method per route at most."""

    @property
    def accepting(self) -> bool:
        """False once the daemon is shutting down."""
        ...

    @property
    def list_generation(self) -> int:
        """Changes whenever any checkpoint does (lets the list be cached)."""
        ...

    def version(self) -> dict[str, Any]: ...

    # checkpoints
    async def checkpoint(self, spec: CheckpointSpec, caller: Caller) -> CheckpointRecord: ...
    async def preflight(
        self, spec: CheckpointSpec, caller: Caller, pre_dump: bool = False
    ) -> Report: ...
    async def list_checkpoints(
        self, caller: Caller, labels: dict[str, str] | None = None
    ) -> list[CheckpointRecord]: ...
    async def get_checkpoint(
        self, ref: str, caller: Caller, owner: str | None = None
    ) -> CheckpointRecord: ...
    async def delete_checkpoint(
        self, ref: str, caller: Caller, owner: str | None = None
    ) -> None: ...
    async def delete_checkpoints(
        self, caller: Caller, older_than: str | None, labels: list[str], owner: str | None = None
    ) -> dict[str, list[dict[str, Any]]]: ...
    async def checkpoint_log(
        self, ref: str, op: str, caller: Caller, owner: str | None = None
    ) -> str: ...

    # archives
    async def export_checkpoint(
        self, ref: str, compression: str, caller: Caller, owner: str | None = None
    ) -> Export: ...
    async def import_archive(
        self,
        body: AsyncIterator[bytes],
        name: str | None,
        content_digest: str | None,
        digest_header: str | None,
        caller: Caller,
    ) -> CheckpointRecord: ...

    # operations (?wait=false)
    def start_checkpoint(self, spec: CheckpointSpec, caller: Caller) -> Operation: ...
    def start_restore(self, spec: RestoreSpec, caller: Caller) -> Operation: ...
    def get_operation(self, op_id: str, caller: Caller) -> Operation: ...
    def list_operations(self, caller: Caller, state: str | None = None) -> list[Operation]: ...
    async def cancel_operation(self, op_id: str, caller: Caller) -> Operation: ...

    # restores
    async def restore(self, spec: RestoreSpec, caller: Caller) -> RestoreRecord: ...
    async def restore_copies(
        self, specs: list[RestoreSpec], caller: Caller
    ) -> list[RestoreRecord]: ...
    async def list_restores(self, caller: Caller) -> list[RestoreRecord]: ...
    async def get_restore(self, restore_id: str, caller: Caller) -> RestoreRecord: ...
    async def signal_restore(
        self, restore_id: str, signo: int, caller: Caller
    ) -> RestoreRecord: ...

    # migrations (the source's, then the destination's side)
    def start_migration(self, spec: MigrationSpec, caller: Caller) -> Operation: ...
    async def migrate(self, spec: MigrationSpec, caller: Caller) -> MigrationResult: ...
    async def open_incoming(
        self, caller: Caller, name: str | None, tls: bool, local: str | None, peer: str | None
    ) -> dict[str, object]: ...
    async def get_incoming(self, inc_id: str, caller: Caller) -> dict[str, object]: ...
    async def commit_incoming(
        self,
        inc_id: str,
        body: AsyncIterator[bytes],
        content_digest: str | None,
        digest_header: str | None,
        caller: Caller,
    ) -> CheckpointRecord: ...
    async def abort_incoming(self, inc_id: str, caller: Caller) -> None: ...

    # processes, fd handles
    async def inspect_process(self, pid: int, caller: Caller) -> Tree: ...
    def list_handles(self, caller: Caller) -> list[FdHandle]: ...
    def delete_handle(self, handle_id: str, caller: Caller) -> None: ...

    # events, metrics
    def event_stream(self, caller: Caller, since: int | None) -> AsyncIterator[bytes]: ...
    def metrics_text(self, caller: Caller) -> tuple[bytes, str]: ...
