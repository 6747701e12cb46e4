"""Every class list and label map of the public cytology sets, in one place.

Class tuples give the index order an `ImageSet` uses; maps go from a set's own class
names (its folder names, or its table's values) to a coarser scheme. Bethesda names are
the short ones papscan's models use (`NILM`, `ASC-US`, `ASC-H`, `LSIL`, `HSIL`, `SCC`).
"""

from __future__ import annotations

from collections.abc import Mapping

# Herlev (Jantzen et al. 2005): folder names as shipped (`superficiel` is the set's spelling).
HERLEV_CLASSES: tuple[str, ...] = (
    "normal_superficiel",
    "normal_intermediate",
    "normal_columnar",
    "light_dysplastic",
    "moderate_dysplastic",
    "severe_dysplastic",
    "carcinoma_in_situ",
)
BINARY_CLASSES: tuple[str, ...] = ("normal", "abnormal")
HERLEV_TO_BINARY: dict[str, str] = {
    c: "normal" if c.startswith("normal_") else "abnormal" for c in HERLEV_CLASSES
}
PAPSCAN_CLASSES: tuple[str, ...] = ("NILM", "LSIL", "HSIL")
HERLEV_TO_BETHESDA: dict[str, str] = {
    "normal_superficiel": "NILM",
    "normal_intermediate": "NILM",
    "normal_columnar": "NILM",
    "light_dysplastic": "LSIL",
    "moderate_dysplastic": "HSIL",
    "severe_dysplastic": "HSIL",
    "carcinoma_in_situ": "HSIL",
}

# SIPaKMeD (Plissiti et al. 2018): its five cell types, and the grouping its paper uses.
SIPAKMED_CLASSES: tuple[str, ...] = (
    "Dyskeratotic",
    "Koilocytotic",
    "Metaplastic",
    "Parabasal",
    "Superficial-Intermediate",
)
SIPAKMED_GROUPS: tuple[str, ...] = ("normal", "benign", "abnormal")
SIPAKMED_TO_GROUP: dict[str, str] = {
    "Superficial-Intermediate": "normal",
    "Parabasal": "normal",
    "Metaplastic": "benign",
    "Koilocytotic": "abnormal",
    "Dyskeratotic": "abnormal",
}

# CRIC Cervix (Rezende et al. 2021): the six Bethesda classes of `classifications.csv`.
BETHESDA_CLASSES: tuple[str, ...] = ("NILM", "ASC-US", "ASC-H", "LSIL", "HSIL", "SCC")
CRIC_TO_BETHESDA: dict[str, str] = {
    "Negative for intraepithelial lesion": "NILM",
    **{c: c for c in BETHESDA_CLASSES},
}
# Bethesda onto papscan's three grades: ASC-US is managed like LSIL, ASC-H and SCC like
# HSIL (the usual low-grade / high-grade split of the squamous categories).
BETHESDA_TO_PAPSCAN: dict[str, str] = {
    "NILM": "NILM",
    "ASC-US": "LSIL",
    "LSIL": "LSIL",
    "ASC-H": "HSIL",
    "HSIL": "HSIL",
    "SCC": "HSIL",
}

# Mendeley LBC (Hussain et al. 2020): ROI-level folder names.
LBC_CLASSES: tuple[str, ...] = ("NL", "LSIL", "HSIL", "SCC")
LBC_TO_BETHESDA: dict[str, str] = {"NL": "NILM", "LSIL": "LSIL", "HSIL": "HSIL", "SCC": "SCC"}

# Paper 004 (CVM-Cervix, 004_f065bcbeb670a7ac.txt, Table 1): CRIC's six classes, then
# SIPaKMeD's five, in the paper's order. CRIC's NILM and SIPaKMeD's normal types stay apart.
SIPAKMED_CRIC_CLASSES: tuple[str, ...] = (
    "ASC-H",
    "ASC-US",
    "SCC",
    "HSIL",
    "LSIL",
    "NILM",
    *SIPAKMED_CLASSES,
)


def class_index_map(
    source: tuple[str, ...], target: tuple[str, ...], mapping: Mapping[str, str] | None = None
) -> dict[int, int]:
    """Index map from one class tuple to another, through an optional name map.

    Args:
        source: Class names in the source index order.
        target: Class names in the target index order.
        mapping: Source name -> target name; None maps each name to itself.

    Returns:
        Source index -> target index.

    Raises:
        ValueError: A source class has no target.
    """
    out = {}
    for i, name in enumerate(source):
        dest = mapping.get(name) if mapping is not None else name
        if dest not in target:
            raise ValueError(f"class {name!r} maps to {dest!r}, which is not in {target}")
        out[i] = target.index(dest)
    return out
