"""The bundle's encoder, segmenter and cell head sessions, opened once and shared by
many slides."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from appliance.pipeline.segmentation import Segmenter
from runtime.backends import AUTO, RuntimeSettings, backend_class
from runtime.bundle_format import Bundle
from runtime.encoder import Encoder
from runtime.heads import CellHeadRunner


class SlideNetworks:
    """The bundle's encoder and segmenter, each opened on first use and kept for
    every slide after that.

    A caller that processes several slides makes one, passes it to each
    ``process_slide`` and closes it at the end (or uses ``with``): one session
    of each network instead of one per slide. Lazy: a slide read from the cache
    opens neither, a single-cell folder never opens the segmenter, and a slide
    without cells never opens the encoder.
    """

    def __init__(self, bundle: Bundle, settings: RuntimeSettings | None = None) -> None:
        self.bundle = bundle
        self.settings = settings or RuntimeSettings()
        self._encoder: Encoder | None = None
        self._segmenter: Segmenter | None = None
        self._cell_head: CellHeadRunner | None = None
        self.embedded = 0  # images embedded so far, over all slides

    def __enter__(self) -> SlideNetworks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def embed(self, patches: np.ndarray, progress: Callable[[int, int], None]) -> np.ndarray:
        if self._encoder is None:
            self._encoder = Encoder(self.bundle, self.settings)
        embeddings = self._encoder.embed(patches, progress=progress)
        self.embedded += len(patches)
        return embeddings

    def classify(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, C) class probabilities from the bundle's cell head ((N, 0) without one)."""
        if self.bundle.cell_head is None:
            return np.zeros((len(embeddings), 0), np.float32)
        if self._cell_head is None:
            self._cell_head = CellHeadRunner(self.bundle, self.settings)
        return self._cell_head.probabilities(embeddings)

    def segmenter(self) -> Segmenter:
        if self._segmenter is None:
            if self.bundle.segmenter is None:
                raise ValueError(
                    f"bundle {self.bundle.name} has no segmenter: it scores cell folders only"
                )
            # "auto" unless the networks run on a server: engines are built for the
            # encoder and heads only, so a configured "tensorrt" could not load the
            # segmenter. The site's measured choice and the backends its GPU self-test
            # refused still hold.
            remote = self.settings.backend != AUTO and backend_class(self.settings.backend).remote
            settings = RuntimeSettings(
                backend=self.settings.backend if remote else AUTO,
                threads=self.settings.threads,
                avoid=self.settings.avoid,
                prefer=self.settings.prefer,
                triton=self.settings.triton,
            )
            self._segmenter = Segmenter.open(self.bundle.path, self.bundle.segmenter, settings)
        return self._segmenter

    @property
    def backend_name(self) -> str:
        return self._encoder.backend_name if self._encoder is not None else ""

    @property
    def variant(self) -> str | None:
        return self._encoder.variant if self._encoder is not None else None

    @property
    def segmenter_variant(self) -> str | None:
        return self._segmenter.variant if self._segmenter is not None else None

    @property
    def segmenter_backend(self) -> str:
        return self._segmenter.network.ran_on if self._segmenter is not None else ""

    def close(self) -> None:
        if self._encoder is not None:
            self._encoder.close()
            self._encoder = None
        if self._segmenter is not None:
            self._segmenter.network.close()
            self._segmenter = None
        if self._cell_head is not None:
            self._cell_head.close()
            self._cell_head = None
