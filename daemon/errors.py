"""The one error hierarchy of criud.

Core code raises these; ``criud.api.problems`` renders them as RFC 9457
``application/problem+json``.  Each class carries the HTTP status and a stable
machine-readable ``code``; engines match on ``code``, people read ``detail``.
Nothing here imports FastAPI, so dump/restore code stays usable without it.
"""

from __future__ import annotations

import errno
from typing import Any, ClassVar


class CriudError(Exception):
    """Root of every error criud reports to a caller."""

    status: ClassVar[int] = 500
    # Not a ClassVar: a few errors (FdPassError) carry a code per instance.
    code: str = "internal_error"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        # Extra members of the problem document (RFC 9457 allows extensions).
        self.extra: dict[str, Any] = extra


# -- 400 / 422: the request itself is wrong -----------------------------------


class UnsupportedByKernel(CriudError):
    """A mode this host's kernel (or criu) cannot do: lazy pages, pre-dump, post-copy.

    Answered before anything is made.  `feature` names what is missing as
    criu calls it (`criu check --feature X`), `capability` the mode asked for.
    """

    status = 422
    code = "unsupported_by_kernel"
    title = "Not supported by this host's kernel"


class FilterRequired(CriudError):
    """A bulk delete named no filter: an empty filter never means "everything"."""

    status = 400
    code = "filter_required"
    title = "A filter is required"


class InvalidRequest(CriudError):
    status = 422
    code = "invalid_request"
    title = "Invalid request"


class InvalidName(CriudError):
    status = 422
    code = "invalid_name"
    title = "Invalid name"


class ManifestInvalid(CriudError):
    """A manifest (a checkpoint's record of its tree) of the wrong shape."""

    status = 422
    code = "manifest_invalid"
    title = "Invalid manifest"


class UnknownInheritKey(CriudError):
    status = 422
    code = "unknown_inherit_key"
    title = "Inherit key not in the checkpoint"


class MissingInheritFd(CriudError):
    status = 422
    code = "missing_inherit_fd"
    title = "External resource without a replacement"


class DuplicateInheritKey(CriudError):
    status = 422
    code = "duplicate_inherit_key"
    title = "Inherit key given twice"


class BadFdHandle(CriudError):
    status = 422
    code = "bad_fd_handle"
    title = "Unusable fd handle"


class InheritPathError(CriudError):
    status = 422
    code = "inherit_path_failed"
    title = "Cannot open the inherit path"


class InheritPathWrongType(CriudError):
    """A path names a dir, socket, block device, or a FIFO without "type": "fifo"."""

    status = 422
    code = "inherit_path_wrong_type"
    title = "The inherit path is not a kind of file that can be inherited"


class FifoNoReader(CriudError):
    """A FIFO asked for writing has no reader: opening it would block."""

    status = 409
    code = "fifo_no_reader"
    title = "Nobody reads the FIFO"


class InheritPathTimeout(CriudError):
    status = 504
    code = "inherit_path_timeout"
    title = "Opening the inherit path took too long"


class InheritOpenerFailed(CriudError):
    """The child that opens caller paths could not run or gave no answer."""

    status = 503
    code = "inherit_opener_failed"
    title = "The path opener failed"


# -- 403 / 404 -----------------------------------------------------------------


class PermissionDenied(CriudError):
    status = 403
    code = "permission_denied"
    title = "Permission denied"


class MixedCredentials(PermissionDenied):
    """A caller's tree whose tasks do not all hold one uid, one gid (and groups)."""

    code = "mixed_credentials"
    title = "The tree's tasks hold mixed uids or gids"


class NeedsCapSysResource(CriudError):
    """A tree only root's criu could dump, where root lacks CAP_SYS_RESOURCE."""

    status = 422
    code = "needs_cap_sys_resource"
    title = "Root's criu cannot dump this tree here"


class ProcessNotFound(CriudError):
    status = 404
    code = "process_not_found"
    title = "No such process"


class CheckpointNotFound(CriudError):
    status = 404
    code = "checkpoint_not_found"
    title = "No such checkpoint"


class RestoreNotFound(CriudError):
    status = 404
    code = "restore_not_found"
    title = "No such restore"


class OperationNotFound(CriudError):
    status = 404
    code = "operation_not_found"
    title = "No such operation"


class OperationCancelled(CriudError):
    status = 409
    code = "operation_cancelled"
    title = "The operation was cancelled"


class OperationEnded(CriudError):
    status = 409
    code = "operation_ended"
    title = "The operation has ended already"


class FdHandleNotFound(CriudError):
    status = 404
    code = "fd_handle_not_found"
    title = "No such fd handle"


class LogNotFound(CriudError):
    status = 404
    code = "log_not_found"
    title = "No such log"


# -- 409: the request conflicts with the state of things -----------------------


class NameTaken(CriudError):
    status = 409
    code = "name_taken"
    title = "Name already in use"


class Busy(CriudError):
    status = 409
    code = "busy"
    title = "Another operation is in progress"


class TreeChanged(CriudError):
    """The tree gained a task between the dump's walk of it and criu's freeze."""

    status = 409
    code = "tree_changed"
    title = "The process tree changed during the checkpoint"


class CheckpointNotReady(CriudError):
    status = 409
    code = "checkpoint_not_ready"
    title = "Checkpoint is not complete"


class PidInUse(CriudError):
    status = 409
    code = "pid_in_use"
    title = "The checkpoint's pids are taken"


class NotRunning(CriudError):
    status = 409
    code = "not_running"
    title = "The restored process is not running"


class CheckpointTampered(CriudError):
    """A file in an images dir is not what criu and the daemon left there."""

    status = 409
    code = "checkpoint_tampered"
    title = "The checkpoint's files were tampered with"


class RestoreUnverified(CriudError):
    """criu reported a restored root the daemon cannot confirm as its own child."""

    status = 409
    code = "restore_unverified"
    title = "The restored root could not be verified"


class RootExited(NotRunning):
    """criu restored the tree, but its root exited before the daemon could watch it.

    The restore is recorded as exited (with the status, when it was ours to
    reap): there is nothing left to signal or wait for.  A 409, as NotRunning.
    """

    code = "restored_root_exited"
    title = "The restored process exited at once"


# -- 5xx: criu or the host ------------------------------------------------------


class CriuUnavailable(CriudError):
    """criu cannot be run at all (missing binary, exec failure)."""

    status = 503
    code = "criu_unavailable"
    title = "criu is unavailable"


class CriuFailed(CriudError):
    """criu ran and refused: carries its first error line and the log's tail.

    A 422 rather than a 500: the daemon did its job, the target (or the
    options the caller chose for it) is what criu could not handle.
    """

    status = 422
    code = "criu_failed"
    title = "criu failed"


class ShuttingDown(CriudError):
    status = 503
    code = "shutting_down"
    title = "The daemon is shutting down"


class Unauthorized(CriudError):
    status = 401
    code = "unauthorized"
    title = "Authentication required"


# -- resource limits: one caller must not exhaust the daemon --------------------
# A caller over its own share gets 429; the daemon out of room (its fd
# budget, a connection pool) answers 503.  Both say "retry later".


class TooManyOperations(CriudError):
    status = 429
    code = "too_many_operations"
    title = "Too many operations in flight for this caller"


class TooManyHandles(CriudError):
    status = 429
    code = "too_many_handles"
    title = "Too many fd handles held by this caller"


class TooManyHeldFds(CriudError):
    status = 429
    code = "too_many_held_fds"
    title = "Too many fds held by this caller's handles"


class TooManyConnections(CriudError):
    status = 503
    code = "too_many_connections"
    title = "Too many connections"


class OutOfFds(CriudError):
    """The daemon's fd table is (or would be) full: EMFILE/ENFILE, or its own budget."""

    status = 503
    code = "out_of_fds"
    title = "The daemon is out of file descriptors"


class QuotaExceeded(CriudError):
    """The caller holds as many checkpoints as its quota allows (--max-checkpoints-per-uid).

    Not "retry later": room comes back only when the caller deletes some.
    """

    status = 409
    code = "quota_exceeded"
    title = "Checkpoint quota exceeded"


class QuotaBytesExceeded(QuotaExceeded):
    """The caller's checkpoints, with the new one, would pass its byte quota."""

    status = 507
    title = "Checkpoint byte quota exceeded"


class HeaderTimeout(CriudError):
    status = 408
    code = "header_timeout"
    title = "The request head did not arrive in time"


# errnos that mean "no fd could be allocated", whoever's table is full.
FD_EXHAUSTION = frozenset({errno.EMFILE, errno.ENFILE})


def out_of_fds(e: BaseException) -> OutOfFds | None:
    """The OutOfFds that e means, if it is EMFILE or ENFILE; None otherwise.

    The one place where fd exhaustion becomes an answer: the API's OSError
    handler and the few places that would otherwise turn an OSError into
    another error (criu "unavailable", a process "not found") ask it first.
    """
    if not isinstance(e, OSError) or e.errno not in FD_EXHAUSTION:
        return None
    which = "the daemon's" if e.errno == errno.EMFILE else "the system's"
    return OutOfFds(
        f"{which} file descriptor table is full ({e.strerror}); retry shortly",
        errno=errno.errorcode.get(e.errno or 0, str(e.errno)),
    )


# -- criu refused, by cause ------------------------------------------------------
# criud.daemon.criu_errors maps criu's log to these codes; each is a CriuFailed,
# so code that handles "criu failed" keeps working.  Two causes reuse existing
# classes: pid_in_use (PidInUse) and permission_denied (PermissionDenied).


class ExternalUnixSocket(CriuFailed):
    status = 422
    code = "external_unix_socket"
    title = "A unix socket's peer is outside the tree"


class TcpEstablishedNeeded(CriuFailed):
    status = 422
    code = "tcp_established_needed"
    title = "The tree has established TCP connections"


class ShellJobNeeded(CriuFailed):
    status = 422
    code = "shell_job_needed"
    title = "The tree is a shell job"


class ExternalTty(CriuFailed):
    status = 422
    code = "external_tty"
    title = "A pty slave's master is outside the tree"


class FileLocksNeeded(CriuFailed):
    status = 422
    code = "file_locks_needed"
    title = "The tree holds file locks"


class GhostFileTooBig(CriuFailed):
    status = 422
    code = "ghost_file_too_big"
    title = "A deleted open file is too big to dump"


class PidNsNotRooted(CriuFailed):
    status = 422
    code = "pid_ns_not_rooted"
    title = "The tree is not rooted at its pid namespace's init"


class FileSizeChanged(CriuFailed):
    status = 422
    code = "file_size_changed"
    title = "A file changed size since the checkpoint"


class ProcessGone(CriuFailed):
    """The target exited or was killed while criu worked on it."""

    status = 409
    code = "process_gone"
    title = "The process went away during the operation"


class CriuTimeout(CriuFailed):
    """criu ran longer than the daemon allows (--criu-timeout) and was killed."""

    status = 504
    code = "criu_timeout"
    title = "criu took too long"


class NoSpace(CriuFailed):
    """The state dir's filesystem is full: criu's images, or the daemon's own
    records (SQLite's SQLITE_FULL) and files (ENOSPC) could not be written."""

    status = 507
    code = "no_space"
    title = "No space left in the state dir"


class WrongFdType(CriudError):
    status = 422
    code = "wrong_fd_type"
    title = "The fd is not of the kind the key needs"


class InvalidCgroup(CriudError):
    status = 422
    code = "invalid_cgroup"
    title = "Invalid cgroup"


class InvalidBundle(CriudError):
    status = 422
    code = "invalid_bundle"
    title = "Unusable OCI bundle"


class PodmanArchiveInvalid(CriudError):
    """A Podman export whose spec.dump, config.dump or descriptors.json is malformed."""

    status = 400
    code = "podman_archive_invalid"
    title = "The Podman checkpoint archive is malformed"


class RootfsDiffUnsafe(CriudError):
    """A rootfs-diff.tar member that leaves the rootfs, or a device node or fifo."""

    status = 422
    code = "rootfs_diff_unsafe"
    title = "The checkpoint's rootfs-diff.tar cannot be applied safely"


class StoreUnusable(CriudError):
    """The database cannot be used: not a database, or of a newer schema."""

    status = 503
    code = "store_unusable"
    title = "The daemon's database is unusable"


# -- archives (criud.daemon.archive): a hostile body is the caller's fault -------


class ArchiveInvalid(CriudError):
    """An imported archive that is not a well-formed tar of the accepted kinds."""

    status = 400
    code = "archive_invalid"
    title = "The archive is not valid"


class ArchiveCorrupt(ArchiveInvalid):
    code = "archive_corrupt"
    title = "The archive's compression or tar headers are corrupt"


class ArchiveTruncated(ArchiveInvalid):
    code = "archive_truncated"
    title = "The archive ends before its end-of-archive marker"


class ArchiveUnsafeName(ArchiveInvalid):
    """An absolute name, a `..` component, or a name beyond the caps."""

    code = "archive_unsafe_name"
    title = "An archive member's name points outside the archive"


class ArchiveLink(ArchiveInvalid):
    code = "archive_link"
    title = "The archive holds a symlink or a hardlink"


class ArchiveSpecialFile(ArchiveInvalid):
    code = "archive_special_file"
    title = "The archive holds a device, a fifo or another special file"


class ArchiveDuplicate(ArchiveInvalid):
    code = "archive_duplicate_member"
    title = "The archive holds a member twice"


class ArchiveChecksumMismatch(ArchiveInvalid):
    code = "archive_checksum_mismatch"
    title = "A member does not match the archive's criud.sha256"


class ArchiveLayoutUnknown(ArchiveInvalid):
    code = "archive_layout_unknown"
    title = "The archive is neither criud's nor a Podman/CRI export"


class ArchiveManifestInvalid(ArchiveInvalid):
    code = "archive_manifest_invalid"
    title = "The archive's criud.json is not a valid manifest"


class ClientGone(CriudError):
    """The client stopped reading an export (or sending an import) before its end."""

    status = 400
    code = "client_gone"
    title = "The client went away"


class DigestMismatch(CriudError):
    """The body does not match the Content-Digest (or Digest) the client sent."""

    status = 400
    code = "digest_mismatch"
    title = "The body does not match its digest"


class ArchiveTooLarge(CriudError):
    """The archive unpacks to more than the daemon's cap (total bytes, members, ratio)."""

    status = 413
    code = "archive_too_large"
    title = "The archive unpacks to more than allowed"


class ArchiveRatio(ArchiveTooLarge):
    code = "archive_ratio_exceeded"
    title = "The archive decompresses beyond the allowed ratio"


# -- migrations ------------------------------------------------------------------


class MigrationNotFound(CriudError):
    status = 404
    code = "migration_not_found"
    title = "No such incoming migration"


class MigrationFailed(CriudError):
    """A migration could not be completed; the source tree runs on, nothing is left."""

    status = 502
    code = "migration_failed"
    title = "The migration failed"


class MigrationRefused(MigrationFailed):
    """The destination daemon refused the migration (its problem is in `destination`)."""

    code = "migration_refused"
    title = "The destination refused the migration"
