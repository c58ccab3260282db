"""The service put together from a configuration, and the signals that stop it.

``cytoedge run`` and the window's ``--with-service`` both build the service here and
stop it the same way: SIGTERM (the service manager, a desktop logout), SIGINT
(Ctrl+C) and SIGHUP (the terminal closed) set the event the service watches, so the
current job is finished or handed back, and the store records a clean stop.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

from appliance.config import Config
from appliance.service.inbox_layout import compile_case_pattern
from appliance.service.service import Service

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class ServiceSetupError(RuntimeError):
    """The service cannot start with this configuration; the message is one line."""


def build_service(config: Config) -> Service:
    """The service over the configured bundle; ServiceSetupError when it cannot start."""
    from appliance.readers import probe
    from appliance.service.engine import PipelineEngine
    from appliance.service.follow import BundleFollower
    from runtime.bundle_format import BundleError

    try:
        compile_case_pattern(config.watch.case_pattern)
    except ValueError as exc:
        raise ServiceSetupError(str(exc)) from None
    follower = BundleFollower(
        config, lambda bundle, settings: PipelineEngine(config, bundle, settings)
    )
    try:
        engine, bundle = follower.open()
    except BundleError as exc:
        raise ServiceSetupError(
            f"no usable model bundle ({exc}); `cytoedge bundle install FILE` installs "
            "one, `cytoedge demo` builds the demo bundle"
        ) from None
    return Service(
        config,
        engine,
        probe=lambda path: probe(path, config.calibration),
        bundle=bundle,
        backend=config.runtime.backend,
        follow=follower,
        bundle_problem=follower.problem,
    )


def stop_on_signals(stop: threading.Event, then: Callable[[], None] | None = None) -> None:
    """SIGTERM, SIGINT and SIGHUP set ``stop``, then call ``then`` (the window closes
    itself); call from the main thread."""

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("stop requested", extra={"signal": signal.Signals(signum).name})
        stop.set()
        if then is not None:
            then()

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)
