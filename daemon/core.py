"""Where the daemon's core was: the names it held, kept so they can be found.

The core became criud.daemon.service (the facade the API calls),
criud.daemon.supervisor (every child), criud.dump.job (a checkpoint) and
criud.restore.job (a restore); see docs/architecture.md.
"""

from __future__ import annotations

from criud.daemon.service import CriudService as Core
from criud.dump.job import CheckpointSpec
from criud.restore.job import RestoreSpec, check_cgroup

__all__ = ["CheckpointSpec", "Core", "RestoreSpec", "check_cgroup"]
