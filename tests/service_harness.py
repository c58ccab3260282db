"""A real ``cytoedge run`` subprocess on a temporary inbox/outbox, for service tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from appliance.service.store import Case, JobStore, StoreError

ROOT = Path(__file__).resolve().parents[1]


def write_config(
    work: Path,
    bundle: Path,
    outbox: Path | None = None,
    *,
    backend: str = "ort-cpu",
    measure_on_start: bool = False,
    **watch: float,
) -> Path:
    """A service's configuration over ``work``; it does not time the CPU paths before
    its first job unless ``measure_on_start`` (one test's subject, minutes of others')."""
    for name in ("inbox", "outbox", "data"):
        (work / name).mkdir(parents=True, exist_ok=True)
    settings = {
        "quiet_seconds": 1.0,
        "case_quiet_seconds": 2.0,
        "rescan_seconds": 2.0,
        **watch,
    }
    lines = [
        "[paths]",
        f'data_dir = "{work / "data"}"',
        f'inbox = "{work / "inbox"}"',
        f'outbox = "{outbox or work / "outbox"}"',
        f'bundle = "{bundle}"',
        "[runtime]",
        f'backend = "{backend}"',
        "threads = 1",
        f"measure_on_start = {str(measure_on_start).lower()}",
        "[watch]",
        *(f"{key} = {value}" for key, value in settings.items()),
        "[service]",
        "max_attempts = 6",
        "retry_seconds = 1.0",
        "stop_grace_seconds = 5.0",
        "[logging]",
        'level = "WARNING"',
    ]
    path = work / "cytoedge.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class ServiceProcess:
    """Starts, stops and kills the service; reads its store read-only. ``command``: the
    cytoedge command that runs it (``gui --with-service``: the window's process)."""

    def __init__(self, config: Path, state_dir: Path, command: tuple[str, ...] = ("run",)) -> None:
        self.config = config
        self.store_path = state_dir / "jobs.sqlite"
        self.log = config.parent / "service.log"
        self.command = command
        self.prefix: tuple[str, ...] = ()  # a command it runs under (a namespace)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        env = {**os.environ, "CYTOEDGE_CONFIG": str(self.config), "QT_QPA_PLATFORM": "offscreen"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "appliance", *self.command],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def terminate(self, timeout: float = 40.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def ensure_stopped(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def read(self, fn: Callable[[JobStore], object]) -> object:
        try:
            store = JobStore(self.store_path, readonly=True, timeout=2.0)
        except StoreError:
            return None
        try:
            return fn(store)
        finally:
            store.close()

    def case(self, key: str) -> Case | None:
        return self.read(lambda s: s.case_by_key(key))  # type: ignore[return-value]

    def case_state(self, key: str) -> str | None:
        case = self.case(key)
        return case.state if case is not None else None

    def wait_for(self, check: Callable[[], object], timeout: float, what: str) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"service exited ({self.proc.returncode}):\n{self.log_text()}")
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}\n{self.log_text()[-3000:]}")


def result_versions(outbox: Path, case_key: str) -> list[str]:
    folder = outbox / case_key
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name[1:].isdigit())


def copy_unit(source: Path, target: Path) -> None:
    """Copy a scan (file or folder) the way a careful tool does: temp name, then rename."""
    temp = target.with_name(target.name + ".part")
    if source.is_dir():
        shutil.copytree(source, temp)
    else:
        shutil.copyfile(source, temp)
    os.rename(temp, target)
