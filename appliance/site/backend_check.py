"""The GPU self-test: every network of a bundle on every backend that loads here, at
each precision it can run there, compared with ONNX Runtime on the CPU (fp32) on the
same inputs, with the export's parity limits (``runtime.parity``), and timed.

``cytoedge doctor --gpu-self-test`` runs it and prints the table; the service runs
it before its first job on a machine with a GPU (and again for a new bundle, GPU
or software). The result is kept in ``<data_dir>/state/gpu-self-test/``; a
backend that failed it is not used for that bundle on this machine
(``RuntimeSettings.avoid``) until the self-test runs again and it passes.
TensorRT engines that are missing are built first (``runtime.engines``), with
progress. ``cytoedge doctor --self-test`` runs the same comparisons on the encoder
and the segmenter on any machine and keeps the fastest path that passed
(``appliance.site.measured_choice``); ``site_settings`` hands it on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from appliance.pipeline.segmentation import Detections, Segmenter, match_detections
from appliance.site.measured_choice import package_versions, preferred_paths
from runtime.backends import (
    BackendError,
    ModelVariants,
    RuntimeSettings,
    backend_class,
    backend_names,
    open_model,
    probe_backends,
)
from runtime.bundle_format import Bundle
from runtime.encoder import encoder_feeds
from runtime.files import write_json_atomic
from runtime.heads import HeadRunner
from runtime.parity import (
    ENCODER_MIN_COSINE,
    ENCODER_MIN_COSINE_BY_VARIANT,
    HEAD_MAX_PROBABILITY_DIFF,
    HEAD_MIN_ATTENTION_COSINE,
    SEGMENTER_DIST_TOLERANCE,
    SEGMENTER_INT8_MAX_EXTRA,
    SEGMENTER_INT8_MIN_IOU,
    SEGMENTER_PROB_TOLERANCE,
    bag_features,
    centred_cosine,
    row_cosines,
    stained_field,
)
from runtime.probe import gpu_names

log = logging.getLogger(__name__)

REFERENCE = "ort-cpu"  # on the fp32 files: what every other backend is compared with
ENCODER_CELLS = 32
TILE_PX = 512
GATE_TILES = 3  # fields of TILE_PX whose detections a reduced-precision segmenter must keep
BAG_CELLS = 512  # the heads' TensorRT profile's optimum
TIMED_RUNS = 3
TICK_SECONDS = 30.0
RECORD_DIR = "gpu-self-test"

ProgressFn = Callable[[str, float], None]
Outputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class Measurement:
    """One network on one backend: how it compared with the reference, and its speed."""

    network: str
    backend: str
    variant: str
    passed: bool | None  # None: the backend did not load it (``detail`` says why)
    metrics: dict[str, float] = field(default_factory=dict)
    limits: dict[str, str] = field(default_factory=dict)
    seconds_per_unit: float = 0.0
    unit: str = ""  # "cell" or "megapixel"
    detail: str = ""


@dataclass(frozen=True)
class SelfTestReport:
    bundle_sha256: str
    measurements: tuple[Measurement, ...]

    @property
    def passed(self) -> bool:
        return all(m.passed is not False for m in self.measurements)

    @property
    def avoid(self) -> tuple[str, ...]:
        """Backends not to score with on this machine: those that broke a limit on any
        network. Never the reference, the last resort of every site (when its int8
        encoder breaks the limit, the table says so and it is for the model owner)."""
        failed = {m.backend for m in self.measurements if m.passed is False} - {REFERENCE}
        return tuple(name for name in backend_names() if name in failed)


class _Loaded(Protocol):
    """A network opened on one backend, with its test input bound."""

    name: str
    variant: str

    def run(self) -> Outputs: ...

    def gate(self) -> Outputs:
        """Outputs the comparison needs beyond one timed run's (untimed)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class _Network:
    label: str
    unit: str
    units: float  # cells or megapixels in one run
    open: Callable[[RuntimeSettings, bool], _Loaded]  # (settings, as the reference)
    compare: Callable[[Outputs, Outputs, str], tuple[dict[str, float], dict[str, str], bool]]
    variants: ModelVariants | None = None  # a network's files; None: heads, not pinned


class _ModelRun:
    def __init__(self, model: Any, feeds: Outputs) -> None:
        self.model, self.feeds = model, feeds
        self.name, self.variant = model.name, model.variant

    def run(self) -> Outputs:
        return {k: np.asarray(v) for k, v in self.model.run(self.feeds).items()}

    def gate(self) -> Outputs:
        return {}

    def close(self) -> None:
        self.model.close()


class _SegmenterRun(_ModelRun):
    """The segmenter timed on one field's network input, and gated on the detections
    it makes on ``tiles`` through the pipeline's own Segmenter."""

    def __init__(self, model: Any, feeds: Outputs, spec: Any, tiles: list[np.ndarray]) -> None:
        super().__init__(model, feeds)
        self.spec, self.tiles = spec, tiles

    def gate(self) -> Outputs:
        segmenter = Segmenter(self.model, self.spec, threads=0, variant=self.variant)
        found = [segmenter.detect(tile) for tile in self.tiles]
        return {
            "det_tile": np.concatenate([np.full(len(d), i) for i, d in enumerate(found)]),
            "det_points": np.concatenate([d.points for d in found]),
            "det_dist": np.concatenate([d.dist for d in found]),
            "det_prob": np.concatenate([d.prob for d in found]),
            "tile_shapes": np.array([tile.shape[:2] for tile in self.tiles]),
        }


class _HeadRun:
    def __init__(self, runner: HeadRunner, bag: np.ndarray) -> None:
        self.runner, self.bag = runner, bag
        self.name, self.variant = runner.backend_name, runner.members[0].variant

    def run(self) -> Outputs:
        result = self.runner.predict(self.bag)
        outputs = self.runner.spec.outputs
        calls = [p.call for p in result.predictions] + [f.call or "" for f in result.findings]
        values = [f.value for f in result.findings if f.value is not None]
        return {
            "probabilities": np.array([result.probabilities[name] for name in outputs]),
            "attention": result.attention,
            "values": np.array(values, np.float64),
            "calls": np.array(calls),
        }

    def gate(self) -> Outputs:
        return {}

    def close(self) -> None:
        self.runner.close()


def run_self_test(
    bundle: Bundle,
    settings: RuntimeSettings,
    *,
    progress: ProgressFn | None = None,
    backends: Sequence[str] | None = None,
    networks: Collection[str] | None = None,
) -> SelfTestReport:
    """Every network of ``bundle`` (or those labelled in ``networks``: "encoder",
    "segmenter", "head <name>") on each of ``backends`` (default: all registered on this
    machine, not the remote ones), at each precision the backend can run it at here
    (``Backend.precisions``)."""
    report = progress or (lambda stage, fraction: None)
    # A remote backend's speed is its server's, not this machine's: never measured here.
    names = list(backends or [n for n in backend_names() if not backend_class(n).remote])
    statuses = {status.name: status for status in probe_backends()}
    if statuses.get("tensorrt") and statuses["tensorrt"].available and "tensorrt" in names:
        build_engines(bundle, report)
    every = _networks(bundle)
    networks = [n for n in every if networks is None or n.label in networks]
    reference_settings = RuntimeSettings(REFERENCE, threads=settings.threads)
    measurements = []
    steps = len(networks) * len(names)
    for index, network in enumerate(networks):
        report(f"{network.label}: reference on {REFERENCE} (fp32)", index * len(names) / steps)
        loaded = network.open(reference_settings, True)
        try:
            reference, _ = _timed(loaded)
            reference |= loaded.gate()
        finally:
            loaded.close()
        for offset, name in enumerate(names):
            report(f"{network.label} on {name}", (index * len(names) + offset) / steps)
            status = statuses.get(name)
            if status is not None and not status.available:
                measurements.append(
                    Measurement(network.label, name, "-", None, detail=status.detail)
                )
                continue
            precisions = ("",)  # the backend's own choice
            if network.variants is not None and status is not None:
                precisions = backend_class(name).precisions(network.variants)
            for precision in precisions:
                candidate = replace(
                    settings, backend=name, avoid=(), build_engines=True, precision=precision
                )
                measurements.append(_measure(network, candidate, reference))
    report("done", 1.0)
    return SelfTestReport(bundle.sha256, tuple(measurements))


def _measure(network: _Network, settings: RuntimeSettings, reference: Outputs) -> Measurement:
    """One network on one backend at one precision, against the reference's outputs."""
    name = settings.backend
    try:
        loaded = network.open(settings, False)
    except BackendError as exc:
        return Measurement(network.label, name, settings.precision or "-", None, detail=str(exc))
    try:
        outputs, seconds = _timed(loaded)
        outputs |= loaded.gate()
    finally:
        loaded.close()
    metrics, limits, passed = network.compare(reference, outputs, loaded.variant)
    return Measurement(
        network.label,
        name,
        loaded.variant,
        passed,
        metrics,
        limits,
        seconds / network.units,
        network.unit,
    )


def build_engines(bundle: Bundle, progress: ProgressFn) -> None:
    """A current TensorRT engine for every fp32 network of the bundle (missing or stale
    ones built now, minutes each); a network TensorRT cannot take is left to the next
    backend, as when scoring."""
    from runtime.engines import UnsupportedModelError, ensure_engine

    files = [bundle.file(bundle.encoder.variants["fp32"])]
    if bundle.segmenter is not None:
        files.append(bundle.file(bundle.segmenter.file))
    files += [bundle.file(rel) for head in bundle.heads for rel in head.files]
    for index, path in enumerate(files):
        stage, fraction = f"TensorRT engine for {path.name}", index / len(files)
        progress(stage, fraction)
        try:
            with _ticking(progress, stage, fraction):
                ensure_engine(path, bundle.engines_dir, build=True)
        except UnsupportedModelError as exc:
            log.info("TensorRT cannot take %s: %s", path.name, exc)
    progress("TensorRT engines ready", 1.0)


@contextlib.contextmanager
def _ticking(progress: ProgressFn, stage: str, fraction: float) -> Iterator[None]:
    """Report the same progress every TICK_SECONDS while one long call (an engine build,
    which says nothing for minutes) runs: a service's watchdog sees it alive."""
    done = threading.Event()

    def tick() -> None:
        while not done.wait(TICK_SECONDS):
            try:
                progress(stage, fraction)
            except Exception:  # the service is stopping: the build ends on its own
                return

    ticker = threading.Thread(target=tick, name="self-test-progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()


def _timed(loaded: _Loaded) -> tuple[Outputs, float]:
    """Outputs and the best of a few timed runs, after one that warms the backend up."""
    outputs = loaded.run()
    best = float("inf")
    for _ in range(TIMED_RUNS):
        start = time.perf_counter()
        outputs = loaded.run()
        best = min(best, time.perf_counter() - start)
    return outputs, best


def _networks(bundle: Bundle) -> list[_Network]:
    spec = bundle.encoder.input
    side = spec.fed_px
    patches = np.stack(
        [stained_field(side, side, cells=1, seed=100 + i) for i in range(ENCODER_CELLS)]
    )
    feeds = encoder_feeds(spec, patches)
    fp32_encoder = ModelVariants(fp32=bundle.file(bundle.encoder.variants["fp32"]))

    def open_encoder(settings: RuntimeSettings, reference: bool) -> _Loaded:
        # The reference loads only the fp32 file; other backends choose as when scoring.
        variants = fp32_encoder if reference else bundle.encoder_variants()
        model = open_model(variants, settings, engine_dir=bundle.engines_dir)
        return _ModelRun(model, feeds)

    networks = [
        _Network(
            "encoder",
            "cell",
            ENCODER_CELLS,
            open_encoder,
            compare_embeddings,
            bundle.encoder_variants(),
        ),
    ]
    if bundle.segmenter is not None:
        segmenter = bundle.segmenter
        tile = stained_field(TILE_PX, TILE_PX, cells=24, seed=7).astype(np.float32) / 255.0
        if segmenter.input_channels == 1:
            tile = tile.mean(axis=2, keepdims=True)
        # Its own name: open_encoder above reads ``feeds`` when it is called.
        tile_feeds = {"input": np.ascontiguousarray(tile[None], dtype=np.float32)}
        gate_tiles = [stained_field(TILE_PX, TILE_PX, 25, seed=4200 + i) for i in range(GATE_TILES)]
        seg_variants = bundle.segmenter_variants()
        assert seg_variants is not None
        fp32_segmenter = ModelVariants(fp32=seg_variants.fp32)

        def open_segmenter(settings: RuntimeSettings, reference: bool) -> _Loaded:
            variants = fp32_segmenter if reference else seg_variants
            model = open_model(variants, settings, engine_dir=bundle.engines_dir)
            return _SegmenterRun(model, tile_feeds, segmenter, gate_tiles)

        networks.append(
            _Network(
                "segmenter",
                "megapixel",
                TILE_PX * TILE_PX / 1e6,
                open_segmenter,
                compare_segmenter,
                seg_variants,
            )
        )
    bag = bag_features(BAG_CELLS, bundle.encoder.embed_dim, seed=9512)
    for head in bundle.heads:
        networks.append(
            _Network(
                f"head {head.name}",
                "cell",
                BAG_CELLS,
                lambda s, _, name=head.name: _HeadRun(HeadRunner(bundle, name, s), bag),
                compare_heads,
            )
        )
    return networks


# --- comparisons: (metrics, limits, passed) ------------------------------------------


def compare_embeddings(
    reference: Outputs, candidate: Outputs, variant: str
) -> tuple[dict[str, float], dict[str, str], bool]:
    """Per-cell cosine against fp32, held to the export gate of the variant that ran."""
    limit = ENCODER_MIN_COSINE_BY_VARIANT.get(variant, ENCODER_MIN_COSINE)
    expected, got = reference["embedding"], candidate["embedding"].astype(np.float32)
    min_cosine = float(row_cosines(expected, got).min())
    metrics = {"min_cosine": min_cosine, "max_abs_diff": float(np.abs(expected - got).max())}
    return metrics, {"min_cosine": f">= {limit}"}, min_cosine >= limit


def compare_segmenter(
    reference: Outputs, candidate: Outputs, variant: str
) -> tuple[dict[str, float], dict[str, str], bool]:
    """fp32: StarDist's probabilities and ray lengths, with the segmenter export's
    tolerances; reduced precision: the int8 segmenter's detection parity on the gate
    tiles (every fp32 detection matched at IoU 0.5, extras at most 1 %)."""
    if variant != "fp32":
        return compare_detections(reference, candidate)
    prob = float(np.abs(reference["prob"] - candidate["prob"]).max())
    dist = float(np.abs(reference["dist"] - candidate["dist"]).max())
    limits = {
        "max_prob_diff": f"<= {SEGMENTER_PROB_TOLERANCE}",
        "max_dist_diff_px": f"<= {SEGMENTER_DIST_TOLERANCE}",
    }
    passed = prob <= SEGMENTER_PROB_TOLERANCE and dist <= SEGMENTER_DIST_TOLERANCE
    return {"max_prob_diff": prob, "max_dist_diff_px": dist}, limits, passed


def compare_detections(
    reference: Outputs, candidate: Outputs
) -> tuple[dict[str, float], dict[str, str], bool]:
    """Detection parity of two segmenter runs on the same gate tiles (``_SegmenterRun``)."""
    counts = None
    for index, shape in enumerate(reference["tile_shapes"]):
        tile = (int(shape[0]), int(shape[1]))
        pair = [_detections(outputs, index) for outputs in (reference, candidate)]
        found = match_detections(pair[0], pair[1], tile, SEGMENTER_INT8_MIN_IOU)
        counts = found if counts is None else counts + found
    assert counts is not None  # GATE_TILES > 0
    expected = counts.true_positives + counts.false_negatives
    metrics = {
        "reference_detections": float(expected),
        "missing": float(counts.false_negatives),
        "extra": float(counts.false_positives),
    }
    limits = {"missing": "== 0", "extra": f"<= {SEGMENTER_INT8_MAX_EXTRA:.0%} of fp32's"}
    passed = (
        expected > 0
        and counts.false_negatives == 0
        and counts.false_positives <= SEGMENTER_INT8_MAX_EXTRA * expected
    )
    return metrics, limits, passed


def _detections(outputs: Outputs, tile: int) -> Detections:
    keep = outputs["det_tile"] == tile
    return Detections(
        outputs["det_points"][keep], outputs["det_dist"][keep], outputs["det_prob"][keep]
    )


def compare_heads(
    reference: Outputs, candidate: Outputs, variant: str
) -> tuple[dict[str, float], dict[str, str], bool]:
    """fp32: probabilities (and values such as hemoglobin) within 1e-4 and attention
    with a centred cosine of at least 0.99999, as the head export's gate; reduced
    precision: not one call changed, as the TensorRT and int8 gates."""
    changed = int(np.sum(reference["calls"] != candidate["calls"]))
    probability = float(np.abs(reference["probabilities"] - candidate["probabilities"]).max())
    values = reference["values"], candidate["values"]
    value = float(np.abs(values[0] - values[1]).max()) if len(values[0]) else 0.0
    attention = centred_cosine(reference["attention"], candidate["attention"])
    metrics = {
        "changed_calls": float(changed),
        "max_probability_diff": probability,
        "max_value_diff": value,
        "min_attention_cosine": attention,
    }
    if variant != "fp32":
        return metrics, {"changed_calls": "== 0"}, changed == 0
    limits = {
        "max_probability_diff": f"<= {HEAD_MAX_PROBABILITY_DIFF}",
        "max_value_diff": f"<= {HEAD_MAX_PROBABILITY_DIFF}",
        "min_attention_cosine": f">= {HEAD_MIN_ATTENTION_COSINE}",
    }
    passed = (
        probability <= HEAD_MAX_PROBABILITY_DIFF
        and value <= HEAD_MAX_PROBABILITY_DIFF
        and attention >= HEAD_MIN_ATTENTION_COSINE
    )
    return metrics, limits, passed


# --- what the service and scoring keep from it ----------------------------------------


def machine_key(bundle: Bundle) -> dict[str, Any]:
    """What a self-test result holds for: this bundle, these GPUs, these packages."""
    return {"bundle_sha256": bundle.sha256, "gpus": gpu_names(), "packages": package_versions()}


def record_path(state_dir: Path, bundle: Bundle) -> Path:
    return state_dir / RECORD_DIR / f"{bundle.sha256[:16]}.json"


def write_record(state_dir: Path, bundle: Bundle, report: SelfTestReport) -> Path:
    path = record_path(state_dir, bundle)
    write_json_atomic(
        path,
        {
            "key": machine_key(bundle),
            "created": time.time(),
            "avoid": list(report.avoid),
            "measurements": [asdict(m) for m in report.measurements],
        },
    )
    return path


def self_test_due(state_dir: Path, bundle: Bundle) -> bool:
    """A GPU is visible and no self-test has run for this bundle, GPU and software."""
    return bool(gpu_names()) and _recorded(state_dir, bundle) is None


def avoided_backends(state_dir: Path, bundle: Bundle) -> tuple[str, ...]:
    """Backends that failed this bundle's self-test on this machine, as it is now."""
    record = _recorded(state_dir, bundle)
    return tuple(record.get("avoid", ())) if record else ()


def site_settings(settings: RuntimeSettings, state_dir: Path, bundle: Bundle) -> RuntimeSettings:
    """The configured settings, less the backends the self-test found wanting here, with
    the paths ``doctor --self-test`` measured fastest here put first."""
    return replace(
        settings,
        avoid=avoided_backends(state_dir, bundle),
        prefer=preferred_paths(state_dir, bundle),
    )


def _recorded(state_dir: Path, bundle: Bundle) -> dict[str, Any] | None:
    path = record_path(state_dir, bundle)
    if not path.is_file():  # the common case on a CPU site: nothing more to ask
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != machine_key(bundle):
        return None
    return record
