"""The bundle the configuration names, followed by the service between jobs.

``cytoedge bundle install`` and ``use`` switch ``<data_dir>/bundles/current`` (a
link to one installed version) in one rename. Between jobs, on the worker's
thread, the follower resolves the configured path: when it leads to another
folder, that bundle is loaded with every check and the next job runs on it; a
job in progress always ends on the bundle it started with. A bundle that does
not load is refused (logged once) and the service keeps the one it has.

While a bundle is in use its files are checked again before each job
(``runtime.bundle_format.FileCheck``: cheap unless a file changed, in full when a
job fails): a damaged file holds scoring (``appliance.service.pause``) until it
is repaired, when the networks are opened afresh, or another bundle is chosen.

On a machine with a GPU, the follower also runs the GPU self-test
(``appliance.site.backend_check``) before the first job with a bundle it has no result
for, and opens the engine without the backends that failed it. On any machine, with
``[runtime] backend = "auto"`` and ``measure_on_start``, it then measures the paths of
the encoder and the segmenter (``appliance.site.self_test.measure``, what ``doctor
--self-test`` runs; from the GPU self-test's own timings when that just ran) when no
measured choice holds for the bundle here, and opens the engine on the fastest. A
measurement that fails is logged and the fixed order stays: it never costs a job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from appliance.config import Config
from appliance.service.store import BundleIdentity
from appliance.service.worker import Engine, JobAbandoned, ProgressFn
from appliance.site.backend_check import (
    SelfTestReport,
    run_self_test,
    self_test_due,
    site_settings,
    write_record,
)
from appliance.site.measured_choice import measurement_due
from appliance.site.self_test import measure
from runtime.backends import AUTO, RuntimeSettings
from runtime.bundle_format import Bundle, BundleError, FileCheck, load_bundle

log = logging.getLogger(__name__)

OpenEngine = Callable[[Bundle, RuntimeSettings], Engine]


def identity(bundle: Bundle) -> BundleIdentity:
    return BundleIdentity(bundle.name, bundle.version, bundle.sha256)


class BundleFollower:
    """``open()`` once at start; then called by the worker between jobs."""

    def __init__(self, config: Config, open_engine: OpenEngine) -> None:
        self.config = config
        self.path = config.bundle_dir
        self.open_engine = open_engine
        self.bundle: Bundle | None = None
        self._files: FileCheck | None = None
        self._damaged = False  # set: the engine is opened afresh once the files match
        self._refused: Path | None = None
        self._self_tested = False

    def open(self) -> tuple[Engine, BundleIdentity]:
        """The engine for the bundle configured now; BundleError when it cannot be used."""
        self._use(load_bundle(self.path.resolve()))
        assert self.bundle is not None
        return self._engine(self.bundle), identity(self.bundle)

    def problem(self, full: bool = False) -> str:
        """What is wrong with the files of the bundle in use ("" when nothing is)."""
        assert self._files is not None, "open() first"
        found = self._files.problem(full=full)
        self._damaged = self._damaged or bool(found)
        return found

    def _use(self, bundle: Bundle) -> None:
        self.bundle, self._files, self._damaged = bundle, FileCheck(bundle), False

    def __call__(self, progress: ProgressFn) -> tuple[Engine, BundleIdentity] | None:
        """(engine, bundle) to run the next jobs with, or None to keep the current ones."""
        switched = self._switched()
        if switched is not None:
            self._use(switched)
            self._self_tested = False
        assert self.bundle is not None, "open() first"
        if self._damaged and not self.problem():
            # Repaired: sessions that failed to open, or opened a damaged file, go.
            self._damaged = False
            switched = switched or self.bundle
        first, self._self_tested = not self._self_tested, True
        if first and self._first_start(self.bundle, progress):
            switched = switched or self.bundle  # the same bundle, on what was measured
        if switched is None:
            return None
        return self._engine(switched), identity(switched)

    def _switched(self) -> Bundle | None:
        assert self.bundle is not None
        target = self.path.resolve()
        if target in (self.bundle.path, self._refused):
            return None
        try:
            bundle = load_bundle(target)
        except BundleError as exc:
            self._refused = target
            log.error(
                "the configured bundle changed but cannot be used; keeping the one loaded",
                extra={"bundle": str(target), "reason": str(exc), "kept": str(self.bundle.path)},
            )
            return None
        self._refused = None
        return bundle

    def _first_start(self, bundle: Bundle, progress: ProgressFn) -> bool:
        """The GPU self-test and the CPU paths' measurement, those due; True when the
        engine is to be opened again on what they found."""
        report = None
        if self_test_due(self.config.state_dir, bundle):
            report = self._self_test(bundle, progress)
        runtime = self.config.runtime
        measured = (
            runtime.measure_on_start
            and runtime.backend == AUTO
            and measurement_due(self.config.state_dir, bundle)
            and self._measure(bundle, progress, report)
        )
        return measured or bool(report and report.avoid)

    def _self_test(self, bundle: Bundle, progress: ProgressFn) -> SelfTestReport:
        """Run it and keep the result."""
        log.warning(
            "first start with this bundle on this GPU: running the GPU self-test "
            "(TensorRT engines are built now; minutes)",
            extra={"bundle": f"{bundle.name} {bundle.version}"},
        )
        report = run_self_test(bundle, self.config.runtime.settings, progress=progress)
        record = write_record(self.config.state_dir, bundle, report)
        failed = [m for m in report.measurements if m.passed is False]
        for row in failed:
            log.error(
                "GPU self-test: a backend disagrees with the CPU",
                extra={"network": row.network, "backend": row.backend, "metrics": row.metrics},
            )
        log.info(
            "GPU self-test finished",
            extra={"passed": report.passed, "avoid": list(report.avoid), "record": str(record)},
        )
        return report

    def _measure(self, bundle: Bundle, progress: ProgressFn, report: SelfTestReport | None) -> bool:
        """Measure the paths (or choose from ``report``) and keep the choice; True when
        a path was chosen. A failure is logged: the engine keeps the fixed order."""
        if report is None:
            log.warning(
                "first start with this bundle on this machine: timing the encoder and the "
                "segmenter on each backend and precision to choose the fastest (a minute "
                "or two; `cytoedge doctor --self-test` shows the table)",
                extra={"bundle": f"{bundle.name} {bundle.version}"},
            )
        try:
            _, choices, record = measure(
                bundle, self.config.runtime.settings, self.config.state_dir, progress, report
            )
        except JobAbandoned:
            raise
        except Exception:
            log.exception(
                "measuring the CPU paths failed; the networks open in the fixed order",
                extra={"bundle": f"{bundle.name} {bundle.version}"},
            )
            return False
        chosen = {c.network: f"{c.backend} {c.precision}" for c in choices}
        log.info("measured choice kept", extra={"chosen": chosen, "record": str(record)})
        return bool(choices)

    def _engine(self, bundle: Bundle) -> Engine:
        settings = site_settings(self.config.runtime.settings, self.config.state_dir, bundle)
        return self.open_engine(bundle, settings)
