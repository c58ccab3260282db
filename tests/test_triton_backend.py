"""The triton backend against a real ``tritonserver`` (the nvidia-pytriton wheel's, on
the CPU, demo/cytoedge_demo/triton_server.py): scores equal local ONNX Runtime's within
the fp32 gate, a bundle the server does not serve is refused in one line, inputs are
checked before they are sent, a server killed mid-case is a temporary problem that
ends once it is back (or runs locally with fallback = "local"; the service retries
the case and loses no scan), several workstation processes share one server, TLS
with the lab's CA, and doctor's report.

Skipped, with the reason, where the wheel cannot run: not Linux x86-64, no
nvidia-pytriton or tritonclient installed, or no stub for this Python.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from appliance.config import ConfigError, load_config
from appliance.service.worker import classify, error_text
from cytoedge_demo.triton_server import Tls, TritonServer, cpu_repository, server_files
from runtime.backends import (
    BackendError,
    BackendUnavailableError,
    RuntimeSettings,
    TritonSettings,
    backend_class,
    open_model,
    plan_backends,
)
from runtime.bundle_format import Bundle
from runtime.encoder import Encoder
from runtime.heads import HeadRunner
from runtime.parity import ENCODER_MIN_COSINE, HEAD_MAX_PROBABILITY_DIFF
from runtime.triton_repo import model_name, write_repository
from tests.runtime_models import TinyBundle
from tests.test_cli import cytoedge

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Bundle, Bundle]:
    """(the bundle the server serves, a later version it does not)."""
    tiny = TinyBundle(tmp_path_factory.mktemp("tiny"))
    served = tiny.write()
    tiny.path = tiny.path.parent / "later"
    return served, tiny.write(version="1.1")


@pytest.fixture(scope="module")
def server(
    bundles: tuple[Bundle, Bundle], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    files = server_files()
    if isinstance(files, str):
        pytest.skip(files)
    work = tmp_path_factory.mktemp("triton")
    write_repository(bundles[0], work / "written", gpu=False)
    repository = cpu_repository(work / "written", work / "repository")
    with TritonServer(repository, work, threads=1) as started:
        yield started


def on_server(server: TritonServer, fallback: str = "none") -> RuntimeSettings:
    return RuntimeSettings(
        "triton", threads=1, triton=TritonSettings(url=server.url, fallback=fallback)
    )


def patches(count: int, side: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def inference_count(server: TritonServer, model: str) -> int:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.url)
    try:
        stats = client.get_inference_statistics(model).model_stats
    finally:
        client.close()
    return sum(entry.inference_count for entry in stats)


def test_scores_through_the_server_equal_local_ones(
    server: TritonServer, bundles: tuple[Bundle, Bundle]
) -> None:
    bundle = bundles[0]
    remote = Encoder(bundle, on_server(server))
    local = Encoder(bundle, RuntimeSettings("ort-cpu", threads=1))
    assert remote.backend_name == "triton"
    assert "version 1 (bundle 1.0" in remote.model.describe()
    cells = patches(40)
    embedded = remote.embed(cells)
    assert cosines(embedded, local.embed(cells)).min() >= ENCODER_MIN_COSINE
    for head in bundle.heads:
        on_triton = HeadRunner(bundle, head.name, on_server(server)).predict(embedded)
        here = HeadRunner(bundle, head.name, RuntimeSettings("ort-cpu", threads=1)).predict(
            embedded
        )
        for output, probability in here.probabilities.items():
            assert abs(on_triton.probabilities[output] - probability) <= HEAD_MAX_PROBABILITY_DIFF
    remote.close()
    local.close()


def test_a_batch_beyond_the_models_limit_is_sent_in_parts(
    server: TritonServer, bundles: tuple[Bundle, Bundle]
) -> None:
    bundle = bundles[0]
    model = open_model(bundle.encoder_variants(), on_server(server))
    local = open_model(bundle.encoder_variants(), RuntimeSettings("ort-cpu", threads=1))
    assert model.max_batch == 256
    name = model_name(bundle.name, "encoder.onnx")
    before = inference_count(server, name)
    pixels = np.random.default_rng(1).normal(size=(300, 3, 32, 32)).astype(np.float32)
    got = model.run({"pixels": pixels})["embedding"]
    assert got.shape == (300, 16)
    assert cosines(got, local.run({"pixels": pixels})["embedding"]).min() >= ENCODER_MIN_COSINE
    assert inference_count(server, name) - before == 300


def test_a_bundle_version_the_server_does_not_serve_is_refused_in_one_line(
    server: TritonServer, bundles: tuple[Bundle, Bundle]
) -> None:
    served, later = bundles
    with pytest.raises(BackendError) as raised:
        open_model(later.encoder_variants(), on_server(server))
    message = str(raised.value)
    assert "\n" not in message
    assert f"1.0 ({served.sha256[:12]})" in message
    assert f"1.1 ({later.sha256[:12]})" in message
    assert not isinstance(raised.value, BackendUnavailableError)


def test_inputs_are_checked_before_anything_is_sent(
    server: TritonServer, bundles: tuple[Bundle, Bundle]
) -> None:
    bundle = bundles[0]
    model = open_model(bundle.encoder_variants(), on_server(server))
    name = model_name(bundle.name, "encoder.onnx")
    before = inference_count(server, name)
    with pytest.raises(BackendError, match="axis 2 must be 32"):
        model.run({"pixels": np.zeros((2, 3, 30, 32), np.float32)})
    with pytest.raises(BackendError, match="must be float32, got complex64"):
        model.run({"pixels": np.zeros((2, 3, 32, 32), np.complex64)})
    with pytest.raises(BackendError, match="missing"):
        model.run({"crops": np.zeros((2, 32, 32, 3), np.uint8)})
    assert inference_count(server, name) == before


def embed_in_a_process(args: tuple[str, str, int]) -> np.ndarray:
    bundle_path, url, seed = args
    from runtime.bundle_format import load_bundle

    settings = RuntimeSettings("triton", threads=1, triton=TritonSettings(url=url))
    encoder = Encoder(load_bundle(bundle_path), settings)
    try:
        return encoder.embed(patches(24, seed=seed))
    finally:
        encoder.close()


def test_several_workstation_processes_share_one_server(
    server: TritonServer, bundles: tuple[Bundle, Bundle]
) -> None:
    bundle = bundles[0]
    name = model_name(bundle.name, "encoder.onnx")
    before = inference_count(server, name)
    jobs = [(str(bundle.path), server.url, seed) for seed in range(3)]
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.map(embed_in_a_process, jobs)
    local = Encoder(bundle, RuntimeSettings("ort-cpu", threads=1))
    for seed, embedded in enumerate(results):
        assert cosines(embedded, local.embed(patches(24, seed=seed))).min() >= ENCODER_MIN_COSINE
    assert inference_count(server, name) - before == 3 * 24


def test_doctor_names_the_server_its_versions_and_whether_they_match(
    server: TritonServer, bundles: tuple[Bundle, Bundle]
) -> None:
    from runtime.backends.triton import check_server

    served, later = bundles
    report = check_server(served, TritonSettings(url=server.url), pings=2)
    assert report.ok
    assert "round trip" in report.lines[0]
    assert "2.51" in report.lines[0]
    encoder_line = next(line for line in report.lines if "__encoder" in line)
    assert "1.0" in encoder_line and "version 1 is this bundle's" in encoder_line
    mismatch = check_server(later, TritonSettings(url=server.url), pings=1)
    assert not mismatch.ok
    assert all("NOT this bundle" in line for line in mismatch.lines[1:])


def test_cytoedge_doctor_runs_the_bundle_on_the_server(
    server: TritonServer, bundles: tuple[Bundle, Bundle], tmp_path: Path
) -> None:
    served, later = bundles
    config = tmp_path / "cytoedge.toml"
    config.write_text(f'[runtime]\nbackend = "triton"\n[runtime.triton]\nurl = "{server.url}"\n')
    result = cytoedge("doctor", "--config", str(config), "--bundle", str(served.path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Triton: triton server" in result.stdout and "round trip" in result.stdout
    encoder_row = next(line for line in result.stdout.splitlines() if "│ encoder" in line)
    assert "triton" in encoder_row
    refused = cytoedge("doctor", "--config", str(config), "--bundle", str(later.path))
    assert refused.returncode == 1
    assert "NOT this bundle" in refused.stdout
    assert "cannot score this bundle on the server" in refused.stdout


def test_a_server_killed_mid_case_is_a_temporary_problem_until_it_is_back(
    server: TritonServer, bundles: tuple[Bundle, Bundle]
) -> None:
    bundle = bundles[0]
    encoder = Encoder(bundle, on_server(server))
    encoder.batch_size = 8
    expected = encoder.embed(patches(32))

    def kill_after_the_first_batch(done: int, total: int) -> None:
        if done == 8:
            server.kill()

    try:
        with pytest.raises(BackendUnavailableError) as raised:
            encoder.embed(patches(32), progress=kill_after_the_first_batch)
        assert classify(raised.value) == "transient"
        assert error_text(raised.value) == (
            "temporary problem: the inference server could not be reached"
        )
        with pytest.raises(BackendUnavailableError):  # a retry while it is down
            encoder.embed(patches(32))
    finally:
        server.start()
    # The retry once it is back: the same opened encoder, the same embeddings.
    np.testing.assert_allclose(encoder.embed(patches(32)), expected, rtol=0, atol=1e-6)
    assert encoder.backend_name == "triton"
    encoder.close()


def test_with_fallback_local_the_workstation_runs_the_networks_itself(
    server: TritonServer, bundles: tuple[Bundle, Bundle]
) -> None:
    bundle = bundles[0]
    local = Encoder(bundle, RuntimeSettings("ort-cpu", threads=1)).embed(patches(16))
    encoder = Encoder(bundle, on_server(server, "local"))
    assert encoder.embed(patches(16)).shape == (16, 16)
    server.kill()
    try:
        # Mid-case: this job is retried (its first batches ran on the server) ...
        with pytest.raises(BackendUnavailableError):
            encoder.embed(patches(16))
        # ... and the retry runs here, and the result says so.
        np.testing.assert_allclose(encoder.embed(patches(16)), local, rtol=0, atol=1e-6)
        assert encoder.backend_name == "ort-cpu (triton unreachable)"
        # Opened while the server is down: the local backend in its place.
        reopened = Encoder(bundle, on_server(server, "local"))
        assert reopened.backend_name == "ort-cpu"
        assert any(f.backend == "triton" for f in reopened.model.fallbacks)
        with pytest.raises(BackendUnavailableError):
            Encoder(bundle, on_server(server))  # without the fallback: retried later
    finally:
        server.start()


def test_the_service_retries_a_case_while_the_server_is_down_and_loses_no_scan(
    server: TritonServer, bundles: tuple[Bundle, Bundle], tmp_path: Path
) -> None:
    from appliance.results import read_result
    from appliance.service.store import DONE
    from cytoedge_demo.synthetic import write_cell_folders
    from tests.service_harness import ServiceProcess, copy_unit, result_versions, write_config

    config = write_config(tmp_path, bundles[0].path, backend="triton")
    with config.open("a") as toml:
        toml.write(f'[runtime.triton]\nurl = "{server.url}"\n')
    write_cell_folders(tmp_path / "cells", 1, 60, seed=5)
    service = ServiceProcess(config, tmp_path / "data" / "state")
    server.kill()
    try:
        service.start()
        copy_unit(tmp_path / "cells" / "P0001", tmp_path / "inbox" / "P0001")
        (tmp_path / "inbox" / "P0001" / ".ready").write_bytes(b"")
        slide = service.wait_for(
            lambda: next(
                (s for s in service.read(lambda store: store.slides()) or [] if s.last_error),
                None,
            ),
            60,
            "a try while the server is down",
        )
        assert slide.last_error == "temporary problem: the inference server could not be reached"
        assert result_versions(tmp_path / "outbox", "P0001") == []
        server.start()
        service.wait_for(lambda: service.case_state("P0001") == DONE, 90, "the case scored")
    finally:
        service.ensure_stopped()
        if server.process is None or server.process.poll() is not None:
            server.start()
    (version,) = result_versions(tmp_path / "outbox", "P0001")
    result = read_result(tmp_path / "outbox" / "P0001" / version)
    assert result.backend == "triton"
    scored = service.read(lambda store: store.slides()[0])
    assert scored.attempts >= 2 and scored.n_cells == 60


def certificates(folder: Path) -> Tls:
    """A CA and a server certificate it signed, for 127.0.0.1 (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def issue(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    ) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        signer_name, signer_key = issuer or (subject, key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, signer_name)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if issuer is None:
            builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                False,
            )
        return builder.sign(signer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    server_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("lab CA", ca_key, None)
    server = issue("gpu-server", server_key, ("lab CA", ca_key))
    folder.mkdir(parents=True, exist_ok=True)
    tls = Tls(folder / "server.pem", folder / "server.key", folder / "ca.pem")
    tls.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    tls.certificate.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    tls.key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return tls


def test_a_server_speaking_tls_is_reached_with_the_labs_ca_only(
    bundles: tuple[Bundle, Bundle], tmp_path: Path
) -> None:
    files = server_files()
    if isinstance(files, str):
        pytest.skip(files)
    bundle = bundles[0]
    encoder = model_name(bundle.name, "encoder.onnx")
    write_repository(bundle, tmp_path / "written", gpu=False)
    repository = cpu_repository(tmp_path / "written", tmp_path / "repository", [encoder])
    tls = certificates(tmp_path / "certs")
    with TritonServer(repository, tmp_path, threads=1, tls=tls) as server:
        secure = TritonSettings(url=server.url, ca_certificate=str(tls.ca))
        model = open_model(
            bundle.encoder_variants(), RuntimeSettings("triton", threads=1, triton=secure)
        )
        pixels = np.random.default_rng(2).normal(size=(4, 3, 32, 32)).astype(np.float32)
        assert model.run({"pixels": pixels})["embedding"].shape == (4, 16)
        model.close()
        with pytest.raises(BackendUnavailableError):  # plain gRPC to a TLS port
            open_model(bundle.encoder_variants(), on_server(server))
        other = certificates(tmp_path / "other")  # a CA that did not sign the server's
        with pytest.raises(BackendUnavailableError):
            open_model(
                bundle.encoder_variants(),
                RuntimeSettings(
                    "triton", triton=TritonSettings(url=server.url, ca_certificate=str(other.ca))
                ),
            )
    with pytest.raises(BackendError, match=r"ca_certificate: .* is not a file"):
        open_model(
            bundle.encoder_variants(),
            RuntimeSettings(
                "triton", triton=TritonSettings(url=server.url, ca_certificate="/nowhere.pem")
            ),
        )


def test_the_triton_section_of_the_configuration(tmp_path: Path) -> None:
    path = tmp_path / "cytoedge.toml"
    path.write_text(
        '[runtime]\nbackend = "triton"\n[runtime.triton]\nurl = "gpu-server.lab:8001"\n'
        'timeout_seconds = 20\nfallback = "local"\n'
    )
    settings = load_config(path).runtime.settings
    assert settings.backend == "triton"
    assert settings.triton == TritonSettings(
        url="gpu-server.lab:8001", timeout_seconds=20.0, fallback="local"
    )
    path.write_text('[runtime.triton]\nfallback = "elsewhere"\n')
    with pytest.raises(ConfigError, match=r"runtime\.triton\.fallback must be one of none, local"):
        load_config(path)
    path.write_text('[runtime.triton]\nhost = "x"\n')
    with pytest.raises(ConfigError, match=r"unknown key runtime\.triton\.host"):
        load_config(path)


def test_auto_never_picks_the_server() -> None:
    assert backend_class("triton").probe().available  # installed here, and still:
    candidates, skipped = plan_backends("auto")
    assert "triton" not in candidates + [f.backend for f in skipped]
    assert plan_backends("triton") == (["triton"], [])


def test_the_segmenter_runs_on_the_server_with_the_bundles_other_networks(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """The suite's trained bundle (a StarDist segmenter, a ViT encoder, a cell head):
    the slide networks open the segmenter on the server too, and its maps equal local ones."""
    from appliance.pipeline.networks import SlideNetworks
    from appliance.pipeline.segmentation import Segmenter
    from cytoedge_demo.synthetic import SmearSpec, render_field
    from runtime.bundle_format import load_bundle
    from runtime.parity import SEGMENTER_DIST_TOLERANCE, SEGMENTER_PROB_TOLERANCE

    files = server_files()
    if isinstance(files, str):
        pytest.skip(files)
    bundle = load_bundle(tiny_bundle)
    write_repository(bundle, tmp_path / "written", gpu=False)
    repository = cpu_repository(tmp_path / "written", tmp_path / "repository")
    image = render_field(SmearSpec(width=256, height=256, seed=3)).image
    local = Segmenter.open(
        bundle.path, bundle.segmenter, RuntimeSettings("ort-cpu", threads=1, precision="fp32")
    )
    with TritonServer(repository, tmp_path, threads=1) as server:
        networks = SlideNetworks(bundle, on_server(server))
        try:
            segmenter = networks.segmenter()
            assert networks.segmenter_backend == "triton"
            prob, dist = segmenter.predict(image)
            expected_prob, expected_dist = local.predict(image)
            assert np.abs(prob - expected_prob).max() <= SEGMENTER_PROB_TOLERANCE
            assert np.abs(dist - expected_dist).max() <= SEGMENTER_DIST_TOLERANCE
            assert (
                networks.classify(np.zeros((3, bundle.encoder.embed_dim), np.float32)).shape[0] == 3
            )
        finally:
            networks.close()
