"""A lab's Triton Inference Server: a network runs there over gRPC instead of here.

The server holds the repository ``cytoedge bundle triton-repo`` wrote
(``runtime.triton_repo``); this backend finds its network's model by the bundle's
name and the file's path, and the version whose parameters carry this
workstation's bundle sha256. At load it checks that the server is live and that
version is ready; a server serving other bundle versions only is refused with one
line naming both. Inputs are checked here (names, ranks, fixed sides, dtypes)
before anything is sent, and a batch larger than the model's ``max_batch_size`` is
sent in parts.

A server that cannot be reached, at load or while a case runs, is a temporary
problem (``BackendUnavailableError``): the job is retried later, like a full disk.
With ``[runtime.triton] fallback = "local"`` the network runs on this machine's own
backends instead: at load the local model is returned in its place; after a
failure mid-case the job is still retried (its earlier batches ran on the server),
and from then on this opened model runs locally and says so (``ran_on``), until it
is opened again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends.base import (
    Backend,
    BackendError,
    BackendStatus,
    BackendUnavailableError,
    Fallback,
    ModelVariants,
    RuntimeSettings,
    TensorSpec,
    TritonSettings,
)
from runtime.bundle_format import BUNDLE_FILE, Bundle
from runtime.triton_repo import WIRE_TYPES, model_name, network_files, served_versions

log = logging.getLogger(__name__)
LOCAL = "local"
# gRPC status codes after which a later try may succeed: the server is down,
# restarting or overloaded, or did not answer in time.
_TEMPORARY = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED")
# gRPC shares one connection per address among a process's clients and, once a server
# went away, waits up to two minutes between reconnects: a retried job would meet the
# old wait although the server is back. Each client connects on its own and retries
# within seconds; messages as large as Triton's (a batch of cells is megabytes).
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
]


def _client_version() -> str | None:
    try:
        return importlib.metadata.version("tritonclient")
    except importlib.metadata.PackageNotFoundError:
        return None


def connect(remote: TritonSettings) -> Any:
    """A gRPC client for ``remote.url`` (TLS when a CA certificate is configured)."""
    if not remote.url:
        raise BackendError("[runtime.triton] url is not set: the server's host:port")
    import tritonclient.grpc as grpcclient

    for key in ("ca_certificate", "client_certificate", "client_key"):
        value = getattr(remote, key)
        if value and not Path(value).expanduser().is_file():
            raise BackendError(f"[runtime.triton] {key}: {value} is not a file")
    tls = bool(remote.ca_certificate)
    return grpcclient.InferenceServerClient(
        remote.url,
        channel_args=CHANNEL_ARGS,
        ssl=tls,
        root_certificates=str(Path(remote.ca_certificate).expanduser()) if tls else None,
        private_key=str(Path(remote.client_key).expanduser()) if remote.client_key else None,
        certificate_chain=(
            str(Path(remote.client_certificate).expanduser()) if remote.client_certificate else None
        ),
    )


def server_error(exc: Exception, url: str, doing: str) -> BackendError:
    """One line for a failed call: BackendUnavailableError when a later try may succeed."""
    status = str(getattr(exc, "status", lambda: "")() or "")
    message = getattr(exc, "message", lambda: str(exc))() or str(exc)
    text = f"triton server {url}: {doing}: {message.splitlines()[0] if message else status}"
    if any(code in status for code in _TEMPORARY) or not status:
        return BackendUnavailableError(text)
    return BackendError(text)


def bundle_of(path: Path) -> tuple[Path, str, str, str]:
    """(bundle folder, name, version, sha256) of the bundle a network file belongs to."""
    for folder in path.resolve().parents:
        manifest = folder / BUNDLE_FILE
        if manifest.is_file():
            raw = manifest.read_bytes()
            try:
                data = json.loads(raw)
                name, version = str(data["name"]), str(data["version"])
            except (ValueError, KeyError, TypeError):
                raise BackendError(f"{manifest}: not a readable bundle.json") from None
            return folder, name, version, hashlib.sha256(raw).hexdigest()
    raise BackendError(f"{path}: not inside a bundle folder (no {BUNDLE_FILE} above it)")


@dataclass(frozen=True)
class ServedModel:
    """What the server says of one model: its config's parameters and tensors."""

    name: str
    versions: dict[int, tuple[str, str]]  # number -> (bundle version, sha256)
    max_batch_size: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def number_for(self, sha256: str) -> int | None:
        return next((n for n, (_, sha) in sorted(self.versions.items()) if sha == sha256), None)

    def served_text(self) -> str:
        shown = [f"{version} ({sha[:12]})" for _, (version, sha) in sorted(self.versions.items())]
        return ", ".join(shown) or "no cytoedge bundle version"


def served_model(client: Any, url: str, name: str, timeout: float | None) -> ServedModel:
    from tritonclient.grpc import model_config_pb2
    from tritonclient.utils import InferenceServerException, triton_to_np_dtype

    try:
        config = client.get_model_config(name, client_timeout=timeout).config
    except InferenceServerException as exc:
        raise server_error(exc, url, f"model {name}") from None
    batched = config.max_batch_size > 0

    def specs(group: Any) -> list[TensorSpec]:
        return [
            TensorSpec(
                t.name,
                (None,) * batched + tuple(d if d >= 0 else None for d in t.dims),
                np.dtype(
                    triton_to_np_dtype(
                        model_config_pb2.DataType.Name(t.data_type).removeprefix("TYPE_")
                    )
                ),
            )
            for t in group
        ]

    parameters = {key: value.string_value for key, value in config.parameters.items()}
    return ServedModel(
        name,
        served_versions(parameters),
        config.max_batch_size,
        specs(config.input),
        specs(config.output),
    )


class TritonBackend(Backend):
    name = "triton"
    priority = 100  # listed last; "auto" never picks it (``remote``)
    remote = True

    @classmethod
    def probe(cls) -> BackendStatus:
        version = _client_version()
        if version is None:
            return BackendStatus(cls.name, False, "tritonclient is not installed")
        return BackendStatus(cls.name, True, f"tritonclient {version}, to [runtime.triton] url")

    @classmethod
    def load(cls, variants: ModelVariants, settings: RuntimeSettings, engines: Path) -> Backend:
        from runtime.backends.choice import open_model
        from runtime.backends.registry import AUTO

        def local() -> Backend:
            return open_model(variants, replace(settings, backend=AUTO), engine_dir=engines)

        fallback = settings.triton.fallback == LOCAL
        try:
            return cls(variants.fp32, settings.triton, local if fallback else None)
        except BackendError as exc:
            if not fallback:
                raise
            log.warning("%s runs on this workstation: %s", variants.fp32.name, exc)
            loaded = local()
            loaded.fallbacks.insert(0, Fallback(cls.name, str(exc)))
            return loaded

    def __init__(
        self, path: Path, remote: TritonSettings, local: Callable[[], Backend] | None = None
    ) -> None:
        super().__init__(path, "fp32")
        self.server = remote
        self._open_local = local
        self._local: Backend | None = None
        self.version = 0  # the model version of this bundle on the server, set by _check
        root, bundle, version, sha256 = bundle_of(path)
        self.model = model_name(bundle, path.resolve().relative_to(root).as_posix())
        self._client = connect(remote)
        try:
            self._served = self._check(bundle, version, sha256)
        except BaseException:
            self._client.close()
            raise

    def _check(self, bundle: str, version: str, sha256: str) -> ServedModel:
        from tritonclient.utils import InferenceServerException

        url, timeout = self.server.url, self.server.timeout_seconds or None
        try:
            live = self._client.is_server_live(client_timeout=timeout)
        except InferenceServerException as exc:
            raise server_error(exc, url, "not reachable") from None
        if not live:
            raise BackendUnavailableError(f"triton server {url} is not live")
        served = served_model(self._client, url, self.model, timeout)
        number = served.number_for(sha256)
        if number is None:
            raise BackendError(
                f"triton server {url} serves {self.model} for bundle {bundle} "
                f"{served.served_text()}; this workstation runs {bundle} {version} "
                f"({sha256[:12]}): add it with `cytoedge bundle triton-repo`"
            )
        try:
            ready = self._client.is_model_ready(self.model, str(number), client_timeout=timeout)
        except InferenceServerException as exc:
            raise server_error(exc, url, f"model {self.model}") from None
        if not ready:
            raise BackendUnavailableError(
                f"triton server {url}: {self.model} version {number} is not ready"
            )
        self.version = number
        return served

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._served.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._served.outputs

    @property
    def preferred_batch(self) -> int:
        return 64 if self._served.max_batch_size else 16

    @property
    def max_batch(self) -> int | None:
        return self._served.max_batch_size or None

    @property
    def ran_on(self) -> str:
        if self._local is not None:
            return f"{self._local.ran_on} (triton unreachable)"
        return self.name

    def describe(self) -> str:
        version, sha = self._served.versions[self.version]
        return (
            f"{self.name} {self.server.url} {self.model} version {self.version} "
            f"(bundle {version}, {sha[:12]})"
        )

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._local is not None:
            return self._local.run(feeds)
        self.check_feeds(feeds)
        arrays = {spec.name: self._cast(spec, feeds[spec.name]) for spec in self.inputs}
        limit = self._served.max_batch_size
        rows = next(iter(arrays.values())).shape[0] if limit else 0
        if not limit or rows <= limit:
            return self._infer(arrays)
        parts = [
            self._infer({name: array[start : start + limit] for name, array in arrays.items()})
            for start in range(0, rows, limit)
        ]
        return {spec.name: np.concatenate([p[spec.name] for p in parts]) for spec in self.outputs}

    def _cast(self, spec: TensorSpec, array: np.ndarray) -> np.ndarray:
        if array.dtype != spec.dtype and not np.can_cast(array.dtype, spec.dtype, "same_kind"):
            raise BackendError(
                f"{self.model}: input {spec.name} must be {spec.dtype}, got {array.dtype}"
            )
        return np.ascontiguousarray(array, dtype=spec.dtype)

    def _infer(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        inputs = []
        for name, array in arrays.items():
            tensor = grpcclient.InferInput(name, list(array.shape), WIRE_TYPES[array.dtype])
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        wanted = [grpcclient.InferRequestedOutput(spec.name) for spec in self.outputs]
        try:
            result = self._client.infer(
                self.model,
                inputs,
                model_version=str(self.version),
                outputs=wanted,
                client_timeout=self.server.timeout_seconds or None,
            )
        except InferenceServerException as exc:
            error = server_error(exc, self.server.url, f"{self.model} failed")
            if isinstance(error, BackendUnavailableError):
                # A fresh connection for the retry: the old one waits out gRPC's
                # reconnect back-off even once the server is back.
                self._client.close()
                self._client = connect(self.server)
                if self._open_local is not None:
                    log.warning("%s; its next inputs run on this workstation", error)
                    self._local = self._open_local()
            raise error from None
        return {spec.name: result.as_numpy(spec.name) for spec in self.outputs}

    def close(self) -> None:
        self._client.close()
        if self._local is not None:
            self._local.close()
            self._local = None


@dataclass(frozen=True)
class ServerCheck:
    """What ``cytoedge doctor`` says of the server: one line per model, and whether
    every network of the bundle is served at the bundle's version."""

    lines: tuple[str, ...]
    ok: bool


def check_server(bundle: Bundle, remote: TritonSettings, pings: int = 5) -> ServerCheck:
    """The server's version, its round-trip time (median of ``pings`` liveness calls)
    and, per network of ``bundle``, its model's versions and whether one is the bundle's."""
    from tritonclient.utils import InferenceServerException

    try:
        client = connect(remote)
    except BackendError as exc:
        return ServerCheck((str(exc),), False)
    timeout = remote.timeout_seconds or None
    try:
        times = []
        for _ in range(pings):
            start = time.perf_counter()
            client.is_server_live(client_timeout=timeout)
            times.append(time.perf_counter() - start)
        metadata = client.get_server_metadata(client_timeout=timeout)
    except InferenceServerException as exc:
        client.close()
        return ServerCheck((str(server_error(exc, remote.url, "not reachable")),), False)
    tls = "TLS" if remote.ca_certificate else "no TLS"
    lines = [
        f"triton server {remote.url}: {metadata.name} {metadata.version}, {tls}, "
        f"round trip {statistics.median(times) * 1000:.1f} ms"
    ]
    ok = True
    try:
        for relative in network_files(bundle):
            name = model_name(bundle.name, relative)
            try:
                served = served_model(client, remote.url, name, timeout)
            except BackendError as exc:
                lines.append(f"{name}: {exc}")
                ok = False
                continue
            number = served.number_for(bundle.sha256)
            verdict = f"version {number} is this bundle's" if number else "NOT this bundle"
            lines.append(f"{name}: serves {served.served_text()}; {verdict}")
            ok = ok and number is not None
    finally:
        client.close()
    return ServerCheck(tuple(lines), ok)
