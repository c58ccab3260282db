"""Site tooling: the bundle versions installed here and the one in use
(installed_bundles.py), new versions with new heads (derived_versions.py), whether a
bundle is verified on this site (verification.py), every backend checked against the
CPU (backend_check.py: the GPU self-test), the expected pace (pace.py) and
``cytoedge doctor`` (doctor.py).
"""
