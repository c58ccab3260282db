"""Cell patches to embeddings on whichever backend the bundle's encoder loads on."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from runtime.backends import Backend, BackendError, RuntimeSettings, open_model
from runtime.bundle_format import Bundle, InputSpec

ProgressCallback = Callable[[int, int], None]  # (cells done, cells in all)


class EncoderInputError(ValueError):
    """Patches of the wrong shape or type; the message is one line."""


def encoder_feeds(spec: InputSpec, patches: np.ndarray) -> dict[str, np.ndarray]:
    """The network's feed for uint8 patches (N, fed_px, fed_px, 3): the crops themselves
    for a folded encoder, else float32 (N, 3, size, size) normalised."""
    if spec.crop_px:
        return {"crops": np.ascontiguousarray(patches, dtype=np.uint8)}
    scaled = patches.astype(np.float32) / 255.0
    pixels = (scaled - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return {"pixels": np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)}


class Encoder:
    """Normalises patches per the bundle and embeds them in batches.

    The file each backend loads is its own choice (``Backend.files``): TensorRT fp16
    engines and ORT-CUDA fp16 on a GPU, the accepted int8 model on a CPU, else fp32.
    """

    def __init__(self, bundle: Bundle, settings: RuntimeSettings | None = None) -> None:
        settings = settings or RuntimeSettings()
        self.spec = bundle.encoder
        self.model: Backend = open_model(
            bundle.encoder_variants(), settings, engine_dir=bundle.engines_dir
        )
        size, crop = self.spec.input.size, self.spec.input.crop_px
        if len(self.model.inputs) != 1:
            raise BackendError(f"{self.model.path.name}: the encoder must have one input")
        self._input = self.model.inputs[0]
        expected = (crop, crop, 3) if crop else (3, size, size)
        if self._input.shape[1:] != expected:
            raise BackendError(
                f"{self.model.path.name}: input {self._input.name} is {self._input.shape}, "
                f"bundle.json says (N, {', '.join(map(str, expected))})"
            )
        if crop and self._input.dtype != np.uint8:
            raise BackendError(
                f"{self.model.path.name}: input {self._input.name} is {self._input.dtype}, "
                "bundle.json says uint8 crops"
            )
        names = [spec.name for spec in self.model.outputs]
        self._output = "embedding" if "embedding" in names else names[0]
        limit = self.model.max_batch or 1 << 30
        self.batch_size = min(settings.batch_size or self.model.preferred_batch, limit)
        mean = np.asarray(self.spec.input.mean, dtype=np.float64)
        std = np.asarray(self.spec.input.std, dtype=np.float64)
        # uint8 -> normalised value by table lookup: one gather per channel, no float temporaries
        # (a folded encoder takes the crops as they are and does this in its graph).
        levels = np.arange(256, dtype=np.float64) / 255.0
        table_dtype = np.float32 if crop else self._input.dtype
        self._table = ((levels[None, :] - mean[:, None]) / std[:, None]).astype(table_dtype)
        self._mean = mean.astype(np.float32)
        self._std = std.astype(np.float32)

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    @property
    def backend_name(self) -> str:
        return self.model.ran_on

    @property
    def variant(self) -> str:
        return self.model.variant

    @property
    def fed_px(self) -> int:
        """The side of the patches ``embed`` takes (the bundle's ``input.fed_px``)."""
        return self.spec.input.fed_px

    def preprocess(self, patches: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 (0..255) or float (0..1) RGB -> what the network takes:
        the uint8 crops themselves for a folded encoder, else (N, 3, S, S) normalised."""
        size = self.fed_px
        if patches.ndim != 4 or patches.shape[1:] != (size, size, 3):
            raise EncoderInputError(
                f"patches must be (N, {size}, {size}, 3) RGB, got shape {patches.shape}"
            )
        if self.spec.input.crop_px:
            if patches.dtype != np.uint8:
                raise EncoderInputError(f"this encoder takes uint8 crops, got {patches.dtype}")
            return np.ascontiguousarray(patches)
        out = np.empty((patches.shape[0], 3, size, size), dtype=self._input.dtype)
        if patches.dtype == np.uint8:
            for channel in range(3):
                np.take(
                    self._table[channel], patches[..., channel], out=out[:, channel], mode="clip"
                )
        elif np.issubdtype(patches.dtype, np.floating):
            for channel in range(3):
                out[:, channel] = (patches[..., channel] - self._mean[channel]) / self._std[channel]
        else:
            raise EncoderInputError(f"patches must be uint8 or float, got {patches.dtype}")
        return out

    def embed(self, patches: np.ndarray, progress: ProgressCallback | None = None) -> np.ndarray:
        """Embeddings (N, embed_dim) float32, batch by batch."""
        total = patches.shape[0] if patches.ndim == 4 else -1
        if total == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        chunks = []
        for start in range(0, max(total, 1), self.batch_size):
            batch = self.preprocess(patches[start : start + self.batch_size])
            result = self.model.run({self._input.name: batch})[self._output]
            if result.shape != (batch.shape[0], self.embed_dim):
                raise BackendError(
                    f"{self.model.path.name}: output {self._output} is {result.shape}, "
                    f"expected ({batch.shape[0]}, {self.embed_dim})"
                )
            chunks.append(np.asarray(result, dtype=np.float32))
            if progress is not None:
                progress(start + batch.shape[0], total)
        return np.concatenate(chunks)

    def close(self) -> None:
        self.model.close()
