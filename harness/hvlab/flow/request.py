"""What `hvlab backup` is asked to do, checked once, the same way wherever it is asked: the
command line on the host (before a lab VM is booted for nothing), the command inside the lab
VM, and the engine's Python API (tests, bench, soak). Only what needs no lab is checked here;
the engine checks the rest (the VMs exist, the run can be resumed, the pool has room)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hvlab.errors import BadInput
from hvlab.flow import dest as backup_dir
from hvlab.flow import faults, preflight
from hvlab.flow import steps as S
from hvlab.lab import runs
from hvlab.lab.definition import check_name

APP_AWARE = ("require", "try", "off")
MODES = ("on-host", "off-host")  # Veeam's two backup modes of step 13


@dataclass(frozen=True)
class BackupRequest:
    vms: tuple[str, ...] = ()
    resume: str | None = None  # a run id
    abort: str | None = None  # a run id
    dest: Path | None = None
    pause_after: int | None = None
    fingerprints: bool = True
    app_aware: str = "try"
    mode: str | None = None  # None: not given (a new run is on-host)
    incremental: bool = False
    model: str | None = None  # None: not given (a new run is 2012r2)
    metadata_limit: int | None = None  # None: not given (preflight's default)
    inject: str | None = None

    @property
    def kind(self) -> str:
        return "resume" if self.resume else "abort" if self.abort else "start"

    def check(self) -> BackupRequest:
        """One line (BadInput) for the first thing wrong; the request itself when all is well."""
        given = [bool(self.vms), self.resume is not None, self.abort is not None]
        if sum(given) != 1:
            raise BadInput("give VMs to back up, or --resume RUN, or --abort RUN (one of them)")
        for vm in self.vms:
            check_name("VM", vm)
        if len(set(self.vms)) != len(self.vms):
            raise BadInput("a VM is named twice")
        for run_id in (self.resume, self.abort):
            if run_id is not None:
                runs.check_id(run_id)
        if self.app_aware not in APP_AWARE:
            raise BadInput(f"invalid --app-aware {self.app_aware!r}: one of "
                           f"{', '.join(APP_AWARE)}")
        if self.mode is not None and self.mode not in MODES:
            raise BadInput(f"invalid --mode {self.mode!r}: one of {', '.join(MODES)}")
        model = S.model(self.model or S.DEFAULT)  # BadInput naming the models
        if self.incremental and model.name == "2012":
            raise BadInput("--incremental with --model 2012: the 2012 model keeps no reference "
                           "point (its host snapshot is deleted whole); use 2012r2 or 2016")
        if self.metadata_limit is not None:
            preflight.check_limit(self.metadata_limit)
        if self.inject is not None:
            faults.parse(self.inject)
        self._check_combinations()
        if self.kind == "start":
            model.pause_position(list(self.vms), self.pause_after)
        elif self.pause_after is not None and not 1 <= self.pause_after < S.LAST:
            # the run's model checks it exactly when it resumes
            raise BadInput(f"--pause-after must be a step number, got {self.pause_after}")
        if self.dest is not None and self.kind == "start":
            backup_dir.check(Path(os.path.abspath(self.dest)))  # again when the run starts
        return self

    def _check_combinations(self) -> None:
        if self.abort and (self.dest or self.pause_after is not None or not self.fingerprints):
            raise BadInput("--abort takes no other option (--dest, --pause-after, "
                           "--no-fingerprints)")
        if self.resume and self.dest:
            raise BadInput("--dest is fixed when a run starts; --resume cannot change it")
        if self.kind != "start" and (self.mode is not None or self.incremental
                                     or self.model is not None):
            raise BadInput("--mode, --model and --incremental are fixed when a run starts; "
                           "not with --resume or --abort")
        if self.kind != "start" and self.metadata_limit is not None:
            raise BadInput("--metadata-limit is checked when a run starts; not with --resume "
                           "or --abort")

    @property
    def limit(self) -> int:
        return (preflight.DEFAULT_METADATA_LIMIT if self.metadata_limit is None
                else self.metadata_limit)
