"""What a clinical site does not install: synthetic smears with hidden labels, the demo
bundle builder, the window's sample queue, and the benchmarks that run on them.

A distribution of its own (``cytoedge-demo``, this folder's pyproject.toml) beside
``cytoedge``: model owners and developers install both, a scoring site only ``cytoedge``.
"""
