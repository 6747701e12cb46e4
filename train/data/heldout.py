"""The fixed split of every real set into train / val / test parts, by group.

The scorecard (`bench/scorecard.py`) measures the shipped models on the `test` part of
each real set, which no training run ever sees; thresholds (the detector's confidence, the
slide operating point) are chosen on `val`; models learn from `train`. A group is the unit
that must not straddle parts: a field (CRIC, Cervix93, SIPaKMeD, the LBC nucleus tiles), a
slide (the Mendeley LBC fields of one smear), a Herlev field (the cells cut from one image).

The assignment depends only on the set's name, the group's name and its stratum (the
group's class, where the set has one), never on which other files are present or on a
seed, so it is the same on every machine and in every run. Within each stratum, groups are
ordered by the SHA-256 of `<set>/<group>`; the first `TEST_FRACTION` of them (at least one
where the stratum has three or more) are `test`, the next `VAL_FRACTION` (at least one
where it has five or more) are `val`, the rest `train`.

ISBI 2014 keeps the split its earlier cards used: EDF010 and EDF011 are `test`, EDF009 is
`val` (its 12 images are too few to stratify).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable

TEST_FRACTION = 0.20
VAL_FRACTION = 0.15
PARTS = ("train", "val", "test")

ISBI_PARTS = {"EDF010": "test", "EDF011": "test", "EDF009": "val"}


def _rank_key(set_name: str, group: str) -> str:
    return hashlib.sha256(f"{set_name}/{group}".encode()).hexdigest()


def assign_parts(set_name: str, groups: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Give each group its part.

    Args:
        set_name: The real set (`cric_fields`, `lbc`, `herlev`, …): part of the hash key.
        groups: `(group, stratum)` pairs; a group listed twice must keep one stratum.

    Returns:
        Group -> `train`, `val` or `test`.

    Raises:
        ValueError: A group is listed under two strata.
    """
    stratum_of: dict[str, str] = {}
    for group, stratum in groups:
        if stratum_of.setdefault(group, stratum) != stratum:
            raise ValueError(
                f"{set_name}: group {group!r} is in strata {stratum_of[group]!r} and {stratum!r}"
            )
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for group, stratum in stratum_of.items():
        by_stratum[stratum].append(group)
    parts: dict[str, str] = {}
    for members in by_stratum.values():
        members.sort(key=lambda g: _rank_key(set_name, g))
        n = len(members)
        n_test = max(round(TEST_FRACTION * n), 1 if n >= 3 else 0)
        n_val = max(round(VAL_FRACTION * n), 1 if n >= 5 else 0)
        for i, group in enumerate(members):
            parts[group] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return parts


def isbi_part(stem: str) -> str:
    """The part of one ISBI 2014 image (`EDF000` …)."""
    return ISBI_PARTS.get(stem, "train")


def split_record(set_name: str, parts: dict[str, str]) -> dict[str, object]:
    """What a model card records of a set's split: the rule and the held-out groups."""
    return {
        "set": set_name,
        "rule": f"by group, stratified, sha256 order; test {TEST_FRACTION}, val {VAL_FRACTION}"
        " (train/data/heldout.py)",
        "counts": {p: sum(v == p for v in parts.values()) for p in PARTS},
        "test": sorted(g for g, p in parts.items() if p == "test"),
        "val": sorted(g for g, p in parts.items() if p == "val"),
    }
