"""Validating a bundle on labelled cases (``cytoedge validate``) and the report that
``cytoedge train`` also writes for its out-of-fold predictions.

measures.py (the figures, from ``appliance.validation.metrics``), pictures.py (ROC and
reliability diagrams), report.py (report.json / .html / .pdf), scoring.py (a
processed cohort scored as the service scores it), run.py (the command's work),
recalibrate.py (new thresholds as a new bundle version), summary.py (the console
table), cases_table.py (the labelled cases table), cohort.py (its scans through the
slide pipeline), metrics.py (the figures, numpy only; training uses them too).
For a cell head on labelled cells: cell_measures.py (its figures), cell_section.py
(its part of the report), cell_run.py (the command's work on labelled cells).
"""
