"""The runtime directory: one daemon, its socket, log, state and FUSE mount.

Chosen by --runtime-dir, else $CONTAINERFS_RUNTIME_DIR, else /run/containerfs
for root and $XDG_RUNTIME_DIR/containerfs for others, so tests run private
daemons that never meet a person's.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

ENV = "CONTAINERFS_RUNTIME_DIR"


@dataclass(frozen=True)
class Runtime:
    path: Path

    @property
    def socket(self) -> Path:
        return self.path / "control.sock"

    @property
    def fs(self) -> Path:
        """Where the daemon mounts its one FUSE filesystem; views bind its subdirectories."""
        return self.path / "fs"

    @property
    def log(self) -> Path:
        return self.path / "daemon.log"

    @property
    def lock(self) -> Path:
        return self.path / "daemon.lock"

    @property
    def state(self) -> Path:
        return self.path / "state"

    def hierarchy_dir(self, hid: int) -> Path:
        return self.fs / str(hid)

    def create(self) -> None:
        self.path.mkdir(mode=0o755, parents=True, exist_ok=True)
        # not exist_ok: that stats fs/, and a killed daemon's dead mount answers ENOTCONN
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.fs, 0o755)
        self.state.mkdir(mode=0o700, exist_ok=True)


def resolve(explicit: str | None = None) -> Runtime:
    if explicit:
        return Runtime(Path(explicit).absolute())
    if os.environ.get(ENV):
        return Runtime(Path(os.environ[ENV]).absolute())
    if os.geteuid() == 0:
        return Runtime(Path("/run/containerfs"))
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/containerfs-{os.geteuid()}"
    return Runtime(Path(base) / "containerfs")
