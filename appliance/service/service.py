"""The service: watcher thread + worker thread over one job store.

``Service.run(stop)`` returns once ``stop`` is set and the current job has
finished or been abandoned; the window can run it in a thread, ``cytoedge
run`` runs it in the main thread with SIGTERM / SIGINT setting ``stop``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import sdnotify

from appliance.config import Config
from appliance.results import case_folder, migrate_case_folders
from appliance.service.audit import AUDIT_FILE, AuditLog
from appliance.service.inbox_layout import compile_case_pattern
from appliance.service.migrations import SCHEMA_VERSION, backup_path
from appliance.service.pause import FreeBytes, WorkHold, free_bytes, is_disk_full
from appliance.service.store import QUEUED, BundleIdentity, JobStore, store_path
from appliance.service.watcher import InboxWatcher, ProbeFn, WatchSettings
from appliance.service.worker import Engine, ProgressFn, Worker, WorkerSettings
from appliance.site.pause_note import PauseNote

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0
# After the grace period, an abandoned job has this long to unwind before the
# process gives up on it (it is then recovered as interrupted on the next start).
ABANDON_SECONDS = 15.0


def software_version() -> str:
    try:
        return importlib.metadata.version("cytoedge")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# Asked by the worker between jobs: (engine, its bundle) to run the next jobs with,
# or None to keep the current ones (see appliance.service.follow).
FollowFn = Callable[[ProgressFn], "tuple[Engine, BundleIdentity] | None"]


class Service:
    def __init__(
        self,
        config: Config,
        engine: Engine,
        *,
        probe: ProbeFn,
        bundle: BundleIdentity,
        backend: str,
        follow: FollowFn | None = None,
        bundle_problem: Callable[[bool], str] | None = None,
        free_space: FreeBytes = free_bytes,
    ) -> None:
        """``bundle_problem(full)``: what is wrong with the files of the bundle in use
        (``BundleFollower.problem``); ``free_space``: free bytes on a path's disk."""
        self.config = config
        self.engine = engine
        self.probe = probe
        self.bundle = bundle
        self.backend = backend
        self.follow = follow
        self.bundle_problem = bundle_problem
        self.free_space = free_space
        self.store_path = store_path(config.state_dir)
        self.audit = AuditLog(
            config.state_dir / AUDIT_FILE,
            max_bytes=config.audit.max_bytes,
            bundle=dataclasses.asdict(bundle),
            backend=backend,
            software_version=software_version(),
        )
        self.notifier = sdnotify.SystemdNotifier()
        self.worker: Worker | None = None
        # Set: no new scans are taken from the inbox (the window's pause button);
        # queued jobs still run.
        self.watching_paused = threading.Event()

    def run(self, stop: threading.Event) -> bool:
        """Serve until ``stop``; True when the worker ended within the bounded time."""
        cfg = self.config
        store = JobStore(self.store_path)
        note = PauseNote(cfg.state_dir)
        if store.migrated_from is not None:
            self.audit.record(
                "store_migrated",
                from_schema=store.migrated_from,
                to_schema=SCHEMA_VERSION,
                copy=str(backup_path(self.store_path, store.migrated_from)),
            )
        self._recover(store)
        self._move_case_folders(store)
        store.register_service(
            os.getpid(),
            socket.gethostname(),
            str(self.bundle),
            self.backend,
            software_version(),
            time.time(),
        )
        wake = threading.Event()
        worker_stop, abandon, watcher_stop = threading.Event(), threading.Event(), threading.Event()
        watcher = InboxWatcher(
            WatchSettings(
                inbox=cfg.inbox.resolve(),
                quiet_seconds=cfg.watch.quiet_seconds,
                rescan_seconds=cfg.watch.rescan_seconds,
                polling=cfg.watch.polling,
                case_pattern=compile_case_pattern(cfg.watch.case_pattern),
                bundle_hash=lambda: self.bundle.sha256,
            ),
            self.store_path,
            self.probe,
            self.audit,
            on_admitted=wake.set,
            paused=self.watching_paused,
        )
        self.worker = Worker(
            self.engine,
            self.store_path,
            WorkerSettings(
                outbox=cfg.outbox,
                case_quiet_seconds=cfg.watch.case_quiet_seconds,
                max_attempts=cfg.service.max_attempts,
                retry_seconds=cfg.service.retry_seconds,
                inbox=cfg.inbox.resolve(),
                archive=cfg.archive_dir.resolve() if cfg.archive_dir else None,
                case_pattern=compile_case_pattern(cfg.watch.case_pattern),
            ),
            self.audit,
            stop=worker_stop,
            abandon=abandon,
            wake=wake,
            refresh=self._between_jobs if self.follow else None,
            hold=WorkHold(
                note,
                data_dir=cfg.data_dir,
                outbox=cfg.outbox,
                bundle_problem=self.bundle_problem,
                slide_needs=lambda path: self.engine.space_needed(path),
                case_cells=lambda case: self._worker().case_cells(case),
                free=self.free_space,
            ),
        )
        threads = [
            threading.Thread(target=watcher.run, args=(watcher_stop,), name="watcher", daemon=True),
            threading.Thread(target=self.worker.run, name="worker", daemon=True),
        ]
        for thread in threads:
            thread.start()
        self.audit.record("service_started", pid=os.getpid(), inbox=str(cfg.inbox))
        log.info(
            "service running",
            extra={"inbox": str(cfg.inbox), "outbox": str(cfg.outbox), "backend": self.backend},
        )
        self.notifier.notify("READY=1")
        try:
            self._supervise(stop, store, threads, note)
        finally:
            clean = self._shut_down(threads, watcher_stop, worker_stop, abandon, wake)
            note.say("")
            try:
                store.service_stopped(time.time())
            except Exception as exc:
                if not is_disk_full(exc):
                    raise
                log.warning("could not record the stop: the data disk is full")
            store.close()
        return clean

    def _supervise(
        self,
        stop: threading.Event,
        store: JobStore,
        threads: list[threading.Thread],
        note: PauseNote,
    ) -> None:
        watchdog_s = int(os.environ.get("WATCHDOG_USEC", "0")) / 1e6
        ping_every = min(HEARTBEAT_SECONDS, watchdog_s / 3) if watchdog_s else HEARTBEAT_SECONDS
        while not stop.wait(ping_every):
            assert self.worker is not None
            alive = all(t.is_alive() for t in threads)
            # A worker stuck inside one call (no progress for the whole watchdog
            # period) stops the pings, and systemd restarts the service.
            fresh = not watchdog_s or time.monotonic() - self.worker.heartbeat < watchdog_s
            if alive and fresh:
                self.notifier.notify("WATCHDOG=1")
            elif not alive:
                log.error("a service thread died; stopping so the service manager restarts")
                raise SystemExit(1)
            note.beat()  # its time: alive, also when the store cannot be written
            try:
                store.heartbeat()
            except Exception as exc:
                # A full disk is said once, by the worker's hold (the pause note).
                if not is_disk_full(exc):
                    log.warning("could not write the service heartbeat", exc_info=True)
            counts = store.counts()
            queued = counts["slides"].get(QUEUED, 0) + counts["cases"].get(QUEUED, 0)
            self.notifier.notify(f"STATUS=queued {queued}; running {self.worker.current or '-'}")

    def _shut_down(
        self,
        threads: list[threading.Thread],
        watcher_stop: threading.Event,
        worker_stop: threading.Event,
        abandon: threading.Event,
        wake: threading.Event,
    ) -> bool:
        """Finish the current job within the grace period, else abandon it cleanly."""
        self.notifier.notify("STOPPING=1")
        watcher_stop.set()
        worker_stop.set()
        wake.set()
        watcher_thread, worker_thread = threads
        worker_thread.join(self.config.service.stop_grace_seconds)
        if worker_thread.is_alive():
            log.info("stopping: abandoning the current job", extra={"job": self._current()})
            abandon.set()
            worker_thread.join(ABANDON_SECONDS)
        watcher_thread.join(5)
        clean = not worker_thread.is_alive()
        self.audit.record("service_stopped", pid=os.getpid(), clean=clean)
        if not clean:
            log.error("the current job did not stop in time", extra={"job": self._current()})
        return clean

    def _between_jobs(self, progress: ProgressFn) -> Engine | None:
        """On the worker thread, between jobs: take up a switched bundle."""
        assert self.follow is not None
        switched = self.follow(progress)
        if switched is None:
            return None
        engine, bundle = switched
        self.engine = engine
        if bundle != self.bundle:
            previous, self.bundle = self.bundle, bundle
            self.audit.set_common(bundle=dataclasses.asdict(bundle))
            self.audit.record("bundle_switched", previous=dataclasses.asdict(previous))
            store = JobStore(self.store_path)
            try:
                store.service_bundle(str(bundle))
            finally:
                store.close()
            log.info(
                "bundle switched between jobs",
                extra={"from": str(previous), "to": str(bundle), "sha256": bundle.sha256},
            )
        return engine

    def _worker(self) -> Worker:
        assert self.worker is not None
        return self.worker

    def _current(self) -> str:
        return self.worker.current if self.worker else ""

    def _recover(self, store: JobStore) -> None:
        for kind, row_id, state in store.recover(self.config.service.max_attempts, time.time()):
            log.warning(
                "job interrupted by a stop or crash",
                extra={"kind": kind, "id": row_id, "to": state},
            )
            self.audit.record("recovered", kind=kind, id=row_id, state=state)
            if kind == "case":
                _remove_staging(case_folder(self.config.outbox, store.case(row_id).case_key))

    def _move_case_folders(self, store: JobStore) -> None:
        """Result versions an earlier release put in a folder another case id shared."""
        for moved in migrate_case_folders(self.config.outbox):
            store.move_result_dir(str(moved.source), str(moved.target))
            self.audit.record(
                "result_moved",
                case=moved.case_id,
                source=str(moved.source),
                target=str(moved.target),
            )


def _remove_staging(case_dir: Path) -> None:
    """Half-assembled versions of a job that was interrupted (never a result)."""
    if not case_dir.is_dir():
        return
    for child in case_dir.iterdir():
        if child.is_dir() and child.name.startswith(".staging-"):
            shutil.rmtree(child, ignore_errors=True)
            log.info("removed an interrupted result's staging folder", extra={"path": str(child)})
