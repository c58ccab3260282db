"""The label lists of the two workloads (docs/METHOD.md A and B), in one place, and the
names under which a labelled case carries them (a cases table's columns)."""

MYELOMA_MARKERS = ("del(17p)", "t(4;14)", "t(11;14)", "gain(1q)")
PB_CLASSES = (
    "acute leukemia",
    "lymphoma",
    "MDS",
    "MDS/MPN",
    "MPN",
    "plasma cell neoplasm",
    "reactive changes",
    "healthy",
)
# A case's class among PB_CLASSES (its final diagnosis) and its hemoglobin in g/dL.
DIAGNOSIS = "diagnosis"
HEMOGLOBIN = "hb"
