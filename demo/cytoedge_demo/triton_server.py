"""A real ``tritonserver`` on this CPU, serving a repository ``bundle triton-repo`` wrote,
for the triton backend's tests and ``cytoedge bench triton``.

The ``nvidia-pytriton`` wheel ships the server binary (2.51) with its Python backend
only: no ONNX Runtime or TensorRT backend. So each model of the written repository
is served as a Python-backend model of the same name, tensors and batching whose
``model.py`` runs the same ``model.onnx`` with ONNX Runtime on the CPU. The client
cannot tell: it speaks to the same server, protocol, configs and version folders a
GPU server with the full build has. What had to be learnt to run it:

- the backend folder must hold the wheel's ``backends/python`` and the stub built for
  this Python (``python_backend_stubs/3.11``); the wheel's own libraries go on
  ``LD_LIBRARY_PATH``;
- the stub's embedded Python ignores ``PYTHONPATH`` for ``sys.path``, so ``model.py``
  puts it there itself (numpy and onnxruntime come from this environment);
- the stub's numpy bridge was built against numpy 1.x and reads numpy 2 arrays as
  zeros: tensors cross it by DLPack instead;
- CUDA, NVML and DCGM warnings on a machine without a GPU are expected.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

STUB_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
START_SECONDS = 90.0  # a model load each starts a stub process and an ONNX Runtime session

MODEL_PY = '''\
"""ONNX Runtime on this version's model.onnx, behind Triton's Python backend."""

import os
import sys

sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        folder = os.path.join(args["model_repository"], args["model_version"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("CYTOEDGE_SERVER_THREADS", "0"))
        self.session = ort.InferenceSession(
            os.path.join(folder, "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.batched = BATCHED

    def execute(self, requests):
        # The scheduler hands over the requests it batched together: one session run
        # for all of them when the model batches, split again per request.
        feeds = [
            {n: np.from_dlpack(pb_utils.get_input_tensor_by_name(r, n)) for n in self.inputs}
            for r in requests
        ]
        if self.batched and len(requests) > 1:
            rows = [len(f[self.inputs[0]]) for f in feeds]
            joined = {n: np.concatenate([f[n] for f in feeds]) for n in self.inputs}
            values = self.session.run(self.outputs, joined)
            ends = np.cumsum(rows)
            parts = [[v[e - r : e] for v in values] for r, e in zip(rows, ends)]
        else:
            parts = [self.session.run(self.outputs, f) for f in feeds]
        return [
            pb_utils.InferenceResponse(
                [
                    pb_utils.Tensor.from_dlpack(n, np.ascontiguousarray(v))
                    for n, v in zip(self.outputs, part)
                ]
            )
            for part in parts
        ]
'''


@dataclass(frozen=True)
class Tls:
    """The server's certificate and key (PEM files), and the CA that signed it."""

    certificate: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class ServerFiles:
    """What the wheel installed: the binary, its Python backend, the stub, its libraries."""

    binary: Path
    backend: Path
    stub: Path
    libraries: Path


def server_files() -> ServerFiles | str:
    """The wheel's files, or why this machine cannot run the server (one line)."""
    if not sys.platform.startswith("linux"):
        return f"tritonserver from nvidia-pytriton runs on Linux only, not {sys.platform}"
    # Found, not imported: only the server's files are used, not pytriton's own binding.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return "nvidia-pytriton is not installed (it ships the tritonserver binary)"
    package = Path(next(iter(spec.submodule_search_locations)))
    server = package / "tritonserver"
    files = ServerFiles(
        server / "bin" / "tritonserver",
        server / "backends" / "python",
        server / "python_backend_stubs" / STUB_PYTHON / "triton_python_backend_stub",
        package.parent / "nvidia_pytriton.libs",
    )
    for path in (files.binary, files.backend, files.stub, files.libraries):
        if not path.exists():
            return f"nvidia-pytriton lacks {path.name} for Python {STUB_PYTHON}"
    return files


def cpu_repository(written: Path, target: Path, models: Collection[str] = ()) -> Path:
    """``target`` as a copy of the repository ``written`` whose models run ONNX Runtime
    in the Python backend on the CPU (same names, tensors, batching, versions); only
    ``models`` when any are named."""
    for model in sorted(p for p in written.iterdir() if p.is_dir()):
        if models and model.name not in models:
            continue
        config = (model / "config.pbtxt").read_text(encoding="utf-8")
        config = config.replace('platform: "onnxruntime_onnx"', 'backend: "python"')
        config = config.replace("KIND_GPU", "KIND_CPU")
        batched = "max_batch_size: 0\n" not in config
        (target / model.name).mkdir(parents=True)
        (target / model.name / "config.pbtxt").write_text(config, encoding="utf-8")
        for version in (p for p in model.iterdir() if p.is_dir() and p.name.isdigit()):
            folder = target / model.name / version.name
            folder.mkdir()
            (folder / "model.onnx").symlink_to((version / "model.onnx").resolve())
            (folder / "model.py").write_text(MODEL_PY.replace("BATCHED", str(batched)))
    return target


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class TritonServer:
    """One ``tritonserver`` process on a repository; ``url`` is its gRPC endpoint."""

    def __init__(
        self, repository: Path, work: Path, *, threads: int = 0, tls: Tls | None = None
    ) -> None:
        files = server_files()
        if isinstance(files, str):
            raise RuntimeError(files)
        self.files = files
        self.repository = repository
        self.work = work
        self.threads = threads
        self.tls = tls
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        backends = work / "backends" / "python"
        backends.mkdir(parents=True, exist_ok=True)
        for source in (*files.backend.iterdir(), files.stub):
            link = backends / source.name
            if source.is_file() and not link.exists():
                link.symlink_to(source)

    def start(self) -> TritonServer:
        import tritonclient.grpc as grpcclient

        env = os.environ | {
            "LD_LIBRARY_PATH": os.pathsep.join(
                p for p in (str(self.files.libraries), os.environ.get("LD_LIBRARY_PATH")) if p
            ),
            "PYTHONPATH": sysconfig.get_paths()["purelib"],
            "CYTOEDGE_SERVER_THREADS": str(self.threads),
        }
        command = [
            str(self.files.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.work / 'backends'}",
            f"--grpc-port={self.port}",
            "--allow-http=false",
            "--allow-metrics=false",
            "--log-verbose=0",
        ]
        if self.tls is not None:
            command += [
                "--grpc-use-ssl=true",
                f"--grpc-server-cert={self.tls.certificate}",
                f"--grpc-server-key={self.tls.key}",
                f"--grpc-root-cert={self.tls.ca}",
            ]
        log = (self.work / "server.log").open("ab")
        # Its own process group: the Python backend's stub processes go with it.
        self.process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        ca = str(self.tls.ca) if self.tls is not None else None
        client = grpcclient.InferenceServerClient(
            self.url, ssl=ca is not None, root_certificates=ca
        )
        deadline = time.monotonic() + START_SECONDS
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"tritonserver exited; see {self.work / 'server.log'}")
                with contextlib.suppress(Exception):
                    if client.is_server_ready(client_timeout=2):
                        return self
                time.sleep(0.2)
        finally:
            client.close()
        self.stop()
        raise RuntimeError(f"tritonserver not ready in {START_SECONDS:.0f} s; see server.log")

    def kill(self) -> None:
        """The server and its stubs gone at once, as when its machine loses power."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)
        self.kill()  # what is left of its group: stubs that outlived it

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def serving(written: Path, work: Path, *, threads: int = 0) -> Iterator[TritonServer]:
    """A started server on the CPU copy of the repository ``written``."""
    repository = cpu_repository(written, work / "repository")
    with TritonServer(repository, work, threads=threads) as server:
        yield server
