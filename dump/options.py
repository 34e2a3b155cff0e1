"""Dump options as the core sees them (a plain dataclass, not the API model)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DumpOptions:
    """Which criu options a checkpoint was taken with."""

    leave_running: bool = False
    shell_job: bool = False
    tcp_established: bool = False
    ext_unix_sk: bool = False
    file_locks: bool = False
    # Keys (as in the manifest) the caller declares external.
    external: tuple[str, ...] = ()
    # Namespaces left out of the image, as (type, key): the restore must hand
    # in an fd of a namespace of that type for the key.
    external_namespaces: tuple[tuple[str, str], ...] = ()

    def criu_flags(self) -> list[str]:
        """The flags that shape a dump and must be repeated at its restore."""
        flags = {
            "--shell-job": self.shell_job,
            "--tcp-established": self.tcp_established,
            "--ext-unix-sk": self.ext_unix_sk,
            "--file-locks": self.file_locks,
        }
        return [flag for flag, on in flags.items() if on]

    def as_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["external"] = list(self.external)
        d["external_namespaces"] = [{"type": t, "key": k} for t, k in self.external_namespaces]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> DumpOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["external"] = tuple(kw.get("external") or ())  # type: ignore[arg-type]
        kw["external_namespaces"] = tuple(
            (str(n["type"]), str(n["key"]))
            for n in kw.get("external_namespaces") or ()  # type: ignore[attr-defined]
        )
        return cls(**kw)  # type: ignore[arg-type]
