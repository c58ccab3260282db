"""The slide pipeline, in the order a scan goes through it.

tiles.py (the cellular zone and its tiles), qc.py (per tile or field, per slide),
stain.py (Macenko), segmentation.py (StarDist through the runtime), cells.py
(filters, nucleus, patches, cell tables), cell_finding.py and embedding_sink.py
(what the scan and field paths share), scans.py, tile_prefetch.py, fields.py and
cell_folders.py (the three kinds of slide), slides.py (``process_slide``: the
dispatch and the cache, slide_cache.py), networks.py (the shared sessions),
cases.py (``score_case``: the heads over a case's cells), progress.py.
"""
