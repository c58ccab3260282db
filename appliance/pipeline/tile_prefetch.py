"""A scan's tiles read, judged and stain-normalised on a worker thread, ahead of the
networks, so that this CPU work overlaps the segmenter's and encoder's on the tiles
before."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from appliance.pipeline import qc, stain, tiles
from appliance.pipeline.cell_finding import SlideParams
from appliance.pipeline.progress import StageTimer
from appliance.pipeline.tiles import Tile, TileSpec
from appliance.readers import Scan

PREPARED_AHEAD = 2  # tiles read, judged and normalised ahead of the networks
Prepared = tuple[Tile, qc.TileQC, np.ndarray | None]  # tile, its QC, normalised if it passed


def prepared_tiles(
    scan: Scan,
    specs: Sequence[TileSpec],
    stains: stain.StainEstimate,
    params: SlideParams,
    timer: StageTimer,
) -> Iterator[Prepared]:
    """``specs``' tiles in order, each with its QC and, when it passed, its normalised
    pixels, prepared up to ``PREPARED_AHEAD`` ahead of the caller. The caller stopping
    early (the cell budget reached) stops the worker; a reader's error reaches the
    caller in order, as if read on its own thread."""
    ready: queue.Queue[Prepared | BaseException | None] = queue.Queue(PREPARED_AHEAD)
    stop = threading.Event()

    def hand_over(item: Prepared | BaseException | None) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for tile in timer.timed(tiles.iter_tiles(scan, specs), "read"):
                with timer.stage("qc"):
                    result = qc.assess_tile(tile.spec.tile_id, tile.core, stains, params.qc)
                normalised = None
                if result.ok:
                    with timer.stage("stain"):
                        normalised = params.normalised(tile.image, stains)
                if not hand_over((tile, result, normalised)):
                    return
            hand_over(None)
        except BaseException as exc:  # handed to the caller, raised there
            hand_over(exc)

    worker = threading.Thread(target=work, name="tile-reader", daemon=True)
    worker.start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()
