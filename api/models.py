"""Pydantic models at the HTTP edge.  Core code uses plain dataclasses instead."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

# Linux pids are at most 2^22 (pid_max); anything beyond is refused early.
PID_MAX = 4_194_304


LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}")
Key = Annotated[str, StringConstraints(min_length=1, max_length=4096)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExternalNamespace(Strict):
    type: Literal["net"] = Field(description="Namespace type (net)")
    key: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class OciRef(Strict):
    """A runc container's OCI bundle (the directory holding config.json)."""

    bundle: str = Field(min_length=1, max_length=4096, pattern=r"^/")
    name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
        description="At restore: the new container's name (its default cgroup is /NAME)",
    )


class CheckpointRequest(Strict):
    pid: int = Field(ge=1, le=PID_MAX, description="Root of the process tree to dump")
    name: str | None = Field(default=None, max_length=128)
    leave_running: bool = False
    shell_job: bool = False
    tcp_established: bool = False
    ext_unix_sk: bool = False
    file_locks: bool = False
    external: list[Key] = Field(
        default_factory=list,
        max_length=64,
        description="Keys (as in the fd manifest) to treat as external",
    )
    oci: OciRef | None = Field(
        default=None, description="Derive criu options from this runc container's bundle"
    )
    external_namespaces: list[ExternalNamespace] = Field(
        default_factory=list,
        max_length=8,
        description="Namespaces to leave out of the image; the restore hands one in by key",
    )
    labels: dict[str, str] = Field(
        default_factory=dict,
        max_length=64,
        description="At most 64; keys [A-Za-z0-9][A-Za-z0-9_.-/]{0,62}, values up to 256 chars",
    )
    pre_dumps: int = Field(
        default=0,
        ge=0,
        le=8,
        description="Iterative pre-dumps before the final dump; needs the kernel's soft-dirty "
        "tracking (422 unsupported_by_kernel where it is missing)",
    )

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for k, val in v.items():
            if LABEL_KEY.fullmatch(k) is None:
                raise ValueError(f"label key {k[:70]!r} must match {LABEL_KEY.pattern}")
            if len(val) > 256 or "\x00" in val:
                raise ValueError(f"label {k!r}: values are at most 256 characters, no NUL")
        return v


class PreflightRequest(CheckpointRequest):
    """A checkpoint's body, plus whether a pre-dump (incremental) would be asked for."""

    pre_dump: bool = Field(
        default=False, description="Check that the kernel supports memory dirty tracking"
    )


class Finding(BaseModel):
    code: str
    task: int
    fd: int | None = None
    key: str | None = None
    message: str
    resolution: str
    resolved: bool


class PreflightReport(BaseModel):
    ok: bool
    blockers: list[Finding]
    warnings: list[Finding]
    estimated_image_bytes: int
    free_bytes: int
    restore_keys: list[str]


class FdEntry(BaseModel):
    pid: int
    fd: int
    type: str
    key: str
    mode: str
    target: str
    inode: int | None = None
    append: bool = False
    external: bool = False
    peer: int | None = None


class FdSummary(BaseModel):
    """A checkpoint's fds in short: counts, and in full only the ones a restore must replace."""

    total: int = Field(description="fds the tree held, all tasks together")
    tasks: int = Field(description="processes in the tree")
    by_type: dict[str, int] = Field(description="fds of each type (pipe, unix, file, tty, ...)")
    external_fds: list[FdEntry] = Field(
        description="The external fds (their keys are `external`), each with its pid and fd"
    )


class Checkpoint(BaseModel):
    id: str
    name: str | None
    owner_uid: int = Field(description="Who made it; names are unique per owner")
    pid: int
    state: str
    created_at: float
    finished_at: float | None = None
    size_bytes: int | None = None
    options: dict[str, Any]
    labels: dict[str, str]
    criu_version: str | None = None
    stats: dict[str, int] | None = None
    fds: list[FdEntry] = Field(
        default_factory=list,
        description="Every fd of every task: only in GET /v1/checkpoints/{ref} (unless "
        "?fds=false); empty in the list and in the answers of POST /v1/checkpoints",
    )
    fd_summary: FdSummary | None = Field(
        default=None,
        description="Counts of the fds and the external ones in full; not in the list",
    )
    external: list[str] = Field(default_factory=list)
    namespaces: dict[str, int] = Field(
        default_factory=dict,
        description="Namespaces of the tree that differ from the daemon's (dumped), by inode",
    )
    error: dict[str, Any] | None = None
    origin: str = Field(
        default="dump",
        description='"dump" (made here), "import:criud" or "import:podman" (an imported archive)',
    )


class DeletedCheckpoint(BaseModel):
    id: str
    name: str | None
    owner_uid: int
    size_bytes: int | None = None


class SkippedCheckpoint(BaseModel):
    id: str
    name: str | None
    owner_uid: int
    code: str = Field(description="Why it was kept, as a problem's code (busy: in use)")
    detail: str


class BulkDeleteResult(BaseModel):
    """What DELETE /v1/checkpoints?... removed, and what it matched but kept."""

    deleted: list[DeletedCheckpoint]
    skipped: list[SkippedCheckpoint]


class InheritFd(Strict):
    """One replacement: by key, by the (pid, fd) it had at dump time, or by path."""

    key: str | None = Field(default=None, max_length=4096)
    pid: int | None = Field(default=None, ge=1, le=PID_MAX)
    fd: int | None = Field(default=None, ge=0, le=1 << 20)
    handle: str | None = Field(default=None, max_length=64)
    index: int | None = Field(default=None, ge=0, le=63)
    path: str | None = Field(default=None, max_length=4096)
    mode: Literal["r", "w", "a", "r+"] | None = None
    type: Literal["fifo"] | None = Field(
        default=None,
        description='Path form only: "fifo" to accept a FIFO (refused otherwise); '
        "mode w needs a reader already",
    )


class StdioRef(Strict):
    """The stdio shorthand: a handle of three fds for the root task's 0, 1 and 2."""

    handle: str = Field(max_length=64)


class CopyFds(Strict):
    """What one copy of a clone restore gets: its own inherit fds and stdio."""

    inherit_fds: list[InheritFd] = Field(default_factory=list, max_length=64)
    stdio: StdioRef | None = None


class RestoreRequest(Strict):
    checkpoint: str = Field(
        max_length=192,
        description='An id, a name of the caller\'s own, or "owner/name" (owner: uid or user name)',
    )
    inherit_fds: list[InheritFd] = Field(default_factory=list, max_length=64)
    cgroup: str | None = Field(
        default=None,
        max_length=256,
        description="Place the restored tree in this cgroup (beneath /criud/ by default)",
    )
    oci: OciRef | None = Field(
        default=None,
        description="For an OCI container: the bundle to restore into (default: its own)",
    )
    stdio: StdioRef | None = Field(
        default=None,
        description="Indices 0, 1 and 2 of this fd handle replace the root task's fds 0, 1 "
        "and 2 at dump time, whatever their kind (pipe, pty, FIFO or file); other "
        "external fds still need their own inherit_fds",
    )
    copies: int = Field(
        default=1,
        ge=1,
        le=32,
        description="Restore this many copies at once (clones), each in fresh namespaces; "
        "only for a tree rooted in its own pid namespace",
    )
    per_copy: list[CopyFds] = Field(
        default_factory=list,
        max_length=32,
        description="With copies: one entry per copy, its own inherit_fds and stdio (an fd "
        "handle is consumed by one restore, so copies cannot share the top-level ones)",
    )
    lazy: bool = Field(
        default=False,
        description="Run the tree before its memory is in: criu lazy-pages serves its pages "
        "on first touch (userfaultfd; 422 unsupported_by_kernel where missing)",
    )


class Restore(BaseModel):
    id: str
    checkpoint: str
    pid: int | None = Field(description="The restored root's pid on the host")
    ns_pid: int | None = Field(
        default=None, description="The restored root's pid inside its own pid namespace"
    )
    state: str
    started_at: float
    finished_at: float | None = None
    exit_code: int | None = None
    exit_signal: int | None = None
    stats: dict[str, int] | None = None
    error: dict[str, Any] | None = None
    lazy: bool = False
    pages_lazy: int | None = Field(
        default=None, description="Pages served lazily (once the lazy-pages server ended)"
    )
    lazy_done_at: float | None = Field(
        default=None, description="When the last lazily served page came in"
    )


class RestoreCopies(BaseModel):
    """The copies a clone restore started, in the order of per_copy."""

    copies: list[Restore]


class SignalRequest(Strict):
    signal: int | str = Field(description="Number or name, e.g. 15 or SIGTERM")


class HandleFdModel(BaseModel):
    index: int
    type: str
    inode: int | None
    key: str
    mode: str
    name: str | None


class FdHandleModel(BaseModel):
    handle: str
    owner_uid: int
    count: int
    fds: list[HandleFdModel]
    created_at: float
    expires_at: float
    expires_in_s: float


class Problem(BaseModel):
    type: str = "about:blank"
    title: str
    status: int
    detail: str
    code: str


class OperationProgress(BaseModel):
    """What was observed of an operation's work; null where nothing could be."""

    bytes_done: int | None = Field(
        None, description="Bytes of images written so far (a dump's images dir, as it grows)"
    )
    bytes_total: int | None = Field(
        None,
        description="Expected bytes: a dump's estimate from the tree's memory, a restore's "
        "checkpoint size",
    )
    pages_done: int | None = Field(None, description="Pages written so far (pages-*.img)")
    pages_total: int | None = Field(
        None, description="Expected pages: the tree's private and shared resident memory"
    )


class Operation(BaseModel):
    """A checkpoint or restore: running, or how it ended."""

    id: str
    kind: Literal["checkpoint", "restore", "export", "import", "migration", "migration_in"]
    state: Literal["running", "done", "failed", "cancelled"]
    owner_uid: int
    target: dict[str, Any] = Field(
        description="What was asked: the pid and name, or the checkpoint"
    )
    created_at: float
    finished_at: float | None
    phase: str | None = Field(
        None,
        description="Where it is: inspecting, dumping, writing (checkpoint); preparing, "
        "restoring (restore); done",
    )
    progress: OperationProgress | None = None
    result: dict[str, Any] | None = Field(
        description="Once done: the checkpoint or the restore, as their own GET gives them"
    )
    problem: dict[str, Any] | None = Field(
        description="Once failed or cancelled: the problem the synchronous call would have answered"
    )


# -- migrations ------------------------------------------------------------------


class MigrationTarget(Strict):
    url: str = Field(max_length=300, description="The destination's TCP listener: http://ADDR:PORT")
    token: str = Field(max_length=4096, description="The destination's bearer token")


class MigrationRequest(Strict):
    pid: int | None = Field(default=None, ge=1, le=PID_MAX, description="Root of the tree to move")
    checkpoint: str | None = Field(
        default=None, max_length=128, description="Or: a done checkpoint to ship (export+import)"
    )
    target: MigrationTarget
    name: str | None = Field(default=None, max_length=128, description="The destination's name")
    leave_running: bool = Field(
        default=False, description="Keep the source tree running after (a copy, not a move)"
    )
    shell_job: bool = False
    tcp_established: bool = False
    ext_unix_sk: bool = False
    file_locks: bool = False
    external: list[Key] = Field(default_factory=list, max_length=64)
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    tls: bool | None = Field(
        default=None, description="Page server TLS; default: when this daemon has CA/cert/key"
    )
    post_copy: bool = Field(
        default=False,
        description="Run the tree on the destination before its pages are in (a remote lazy "
        "dump); answered unsupported_by_kernel where /v1/version says post_copy_migration is "
        "not supported",
    )


class Migration(BaseModel):
    checkpoint: str = Field(description="The destination's checkpoint id")
    destination: str
    source_pid: int | None
    tls: bool
    timing: dict[str, float] = Field(
        description="Seconds: frozen (criu's), pages (the dump's push), other_images, total"
    )
    bytes_sent: int = Field(description="The archive of the other images, as sent")
    destination_checkpoint: dict[str, Any]


class IncomingRequest(Strict):
    name: str | None = Field(default=None, max_length=128)
    tls: bool = False


class Incoming(BaseModel):
    id: str
    address: str
    port: int
    tls: bool
    expires: float
    state: str
    page_server_pid: int | None = None
    bytes_received: int | None = Field(
        default=None, description="What the page server has written so far (pages pushed)"
    )
    error: dict[str, Any] | None = Field(
        default=None, description="Why the page server failed (its code and detail)"
    )
