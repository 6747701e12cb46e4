"""The slide call: evidence from cells and ROIs -> a Bethesda category and a calibrated score.

The rules live in one file, `slide_call.yaml` at the root of the model repository, fitted
on the scorecard's validation part (`bench/scorecard.py --part val --fit-operating-point`)
for the models beside it, one score rule per preparation (liquid-based, conventional);
every number there says what it means and what data set it.
A repository without one is scanned with `OperatingPoint()`'s unfitted defaults, and the
scan records that it was (`operating_point: unfitted`).

The call, in order:

1. **Calibrated score**: a logistic model over three size-robust features of the slide
   (`FEATURES`), read as the probability that the slide is abnormal. No single cell or
   single ROI decides: a lone confident cell moves `top_suspicion` a little, not the call.
2. **Abnormal or not**: the score against `abnormal_threshold`, chosen on validation data
   for sensitivity >= 0.95 with the best specificity it allows.
3. **Grade** (abnormal slides): the most severe model class that at least `min_cells` of
   its (or a worse class's) confident cells reach; short of that, the Bethesda
   "atypical" category: ASC-H when the most severe class dominates the top cells,
   else ASC-US.
4. **Adequacy** (TBS 2014): the squamous-cell estimate against the preparation's minimum;
   below it a slide is "Unsatisfactory for evaluation" unless it is abnormal (a slide with
   abnormal cells is never unsatisfactory; its scant cellularity is noted).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engines.errors import ModelConfigError

__all__ = [
    "BETHESDA",
    "FEATURES",
    "OPERATING_POINT_FILE",
    "PREPARATIONS",
    "SLIDE_PREPARATIONS",
    "ScoreRule",
    "UNSATISFACTORY",
    "Adequacy",
    "OperatingPoint",
    "SlideCall",
    "SlideEvidence",
]

OPERATING_POINT_FILE = "slide_call.yaml"
UNSATISFACTORY = "Unsatisfactory for evaluation"
BETHESDA = ("NILM", "ASC-US", "LSIL", "ASC-H", "HSIL", "SCC")
FEATURES = ("top_suspicion", "top_roi_abnormal", "suspicious_fraction")
# TBS 2014 minimum squamous cellularity per preparation.
PREPARATIONS = {"liquid-based": 5000, "conventional": 8000}
SLIDE_PREPARATIONS = tuple(PREPARATIONS)
_EPS = 1e-4


@dataclass(frozen=True)
class SlideEvidence:
    """What the aggregator measured on a slide, all it takes to make the call.

    Attributes:
        cell_count: cells kept on the slide (after cross-ROI de-duplication).
        roi_count: ROIs scanned.
        top_suspicion: mean suspicion of the slide's most suspicious `top_fraction` of
            cells, at least `top_n` of them (0: none).
        top_roi_abnormal: mean abnormal probability of the most abnormal `top_fraction`
            of the ROIs holding at least `roi_min_cells` cells, at least one (0: none).
        suspicious_fraction: the fraction of cells with suspicion >= 0.5.
        confident: class -> cells labelled so with probability >= the cell confidence.
        top_class_mass: class -> mean probability of that class over the top cells.
    """

    cell_count: int
    roi_count: int
    top_suspicion: float
    top_roi_abnormal: float
    suspicious_fraction: float
    confident: dict[str, int]
    top_class_mass: dict[str, float]

    def features(self) -> list[float]:
        return [float(getattr(self, name)) for name in FEATURES]


@dataclass(frozen=True)
class Adequacy:
    """TBS 2014 adequacy: the squamous-cell estimate against the preparation's minimum."""

    satisfactory: bool
    squamous_estimate: int
    minimum: int
    preparation: str
    method: str = (
        "nuclei detected over the slide's whole cellular area, every cell type counted"
        " (the detector does not tell squamous cells from others: heavy inflammation"
        " over-counts)"
    )


@dataclass(frozen=True)
class SlideCall:
    """The slide's category, calibrated score, adequacy and notes."""

    category: str
    score: float
    abnormal: bool
    adequacy: Adequacy
    operating_point: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ScoreRule:
    """The calibrated score and threshold of one preparation.

    Attributes:
        coef, intercept: the logistic model over `FEATURES`, each taken as its logit.
        abnormal_threshold: the calibrated score from which a slide is abnormal.
        fitted_on: the validation sets and counts that set these numbers (None: unfitted).
    """

    coef: tuple[float, ...] = (0.5, 0.2, 0.2)
    intercept: float = 0.0
    abnormal_threshold: float = 0.5
    fitted_on: dict[str, Any] | None = None

    def score(self, evidence: SlideEvidence) -> float:
        z = self.intercept + sum(
            c * _logit(x) for c, x in zip(self.coef, evidence.features(), strict=True)
        )
        return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z))))


@dataclass(frozen=True)
class OperatingPoint:
    """The rules of the slide call (see the module docstring); `load` reads the file.

    Liquid-based and conventional slides get a score rule each: the models' scores are
    distributed differently on the two (the ROI model learned from liquid-based fields).

    Attributes:
        version: names the fit, recorded on every scan made with it.
        fitted_on: what data set it (part, date, models' sha256); None when unfitted.
        rules: preparation -> its `ScoreRule`.
        cell_confidence: a cell counts as confident evidence from this probability.
        min_cells: class -> confident cells of it (or worse) that grade a slide so.
        top_fraction: the share of cells and ROIs the top features average.
        top_n: cells averaged for `top_suspicion` at least.
        roi_min_cells: an ROI's abnormal probability counts with at least this many cells.
    """

    version: str = "unfitted"
    fitted_on: dict[str, Any] | None = None
    rules: dict[str, ScoreRule] = field(
        default_factory=lambda: {p: ScoreRule() for p in SLIDE_PREPARATIONS}
    )
    cell_confidence: float = 0.8
    min_cells: dict[str, int] = field(default_factory=lambda: {"LSIL": 3, "HSIL": 3})
    top_fraction: float = 0.01
    top_n: int = 10
    roi_min_cells: int = 3

    @classmethod
    def load(cls, path: Path) -> OperatingPoint:
        """Read `slide_call.yaml`.

        Raises:
            ModelConfigError: the file is unreadable or lacks a field, in one sentence.
        """
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
            rules = {
                str(prep): ScoreRule(
                    coef=tuple(float(c) for c in rule["coef"]),
                    intercept=float(rule["intercept"]),
                    abnormal_threshold=float(rule["abnormal_threshold"]),
                    fitted_on=rule.get("fitted_on"),
                )
                for prep, rule in raw["rules"].items()
            }
            op = cls(
                version=str(raw["version"]),
                fitted_on=raw.get("fitted_on"),
                rules=rules,
                cell_confidence=float(raw["cell_confidence"]),
                min_cells={str(k): int(v) for k, v in raw["min_cells"].items()},
                top_fraction=float(raw.get("top_fraction", 0.01)),
                top_n=int(raw.get("top_n", 10)),
                roi_min_cells=int(raw.get("roi_min_cells", 3)),
            )
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelConfigError(
                f"{path}: not a valid operating point ({type(exc).__name__}: {exc})."
            ) from exc
        missing = [p for p in SLIDE_PREPARATIONS if p not in op.rules]
        bad = [p for p, r in op.rules.items() if len(r.coef) != len(FEATURES)]
        if missing or bad:
            raise ModelConfigError(
                f"{path}: needs a rule for each of {', '.join(SLIDE_PREPARATIONS)} with"
                f" {len(FEATURES)} coefficients (missing: {missing}, wrong size: {bad})."
            )
        return op

    @classmethod
    def for_repository(cls, repository_path: Path) -> OperatingPoint:
        """The repository's `slide_call.yaml`, or the unfitted defaults without one."""
        path = Path(repository_path) / OPERATING_POINT_FILE
        return cls.load(path) if path.is_file() else cls()

    def score(self, evidence: SlideEvidence, preparation: str) -> float:
        """The calibrated probability that the slide is abnormal."""
        return self.rules[preparation].score(evidence)

    def call(
        self,
        evidence: SlideEvidence,
        severity: tuple[str, ...],
        preparation: str | None,
        check_adequacy: bool = True,
    ) -> SlideCall:
        """Turn the evidence into the slide's call.

        Args:
            severity: the models' classes, least to most severe (`severity[0]` normal).
            preparation: one of `SLIDE_PREPARATIONS`: its score rule and adequacy minimum;
                None (not given): liquid-based, with a note.
            check_adequacy: False for an image that is not a whole slide (a field).
        """
        notes: list[str] = []
        if preparation is None:
            preparation = "liquid-based"
            notes.append("the preparation was not given: liquid-based assumed.")
        minimum = PREPARATIONS[preparation] if check_adequacy else 0
        adequacy = Adequacy(
            satisfactory=evidence.cell_count >= minimum and evidence.cell_count > 0,
            squamous_estimate=evidence.cell_count,
            minimum=minimum,
            preparation=preparation,
        )
        rule = self.rules[preparation]
        score = rule.score(evidence) if evidence.cell_count else 0.0
        abnormal = score >= rule.abnormal_threshold and evidence.cell_count > 0
        if abnormal:
            category = self.grade(evidence, severity)
            if not adequacy.satisfactory:
                notes.append(
                    f"scant cellularity: about {evidence.cell_count} cells, under the"
                    f" {minimum} a {preparation} preparation needs."
                )
        elif not adequacy.satisfactory:
            category = UNSATISFACTORY
            notes.append(_why_unsatisfactory(evidence, minimum, preparation))
        else:
            category = severity[0]
        return SlideCall(category, round(score, 6), abnormal, adequacy, self.version, notes)

    def grade(self, evidence: SlideEvidence, severity: tuple[str, ...]) -> str:
        """The category of a slide called abnormal (see the module docstring, step 3)."""
        at_least = 0
        for label in reversed(severity[1:]):
            at_least += evidence.confident.get(label, 0)
            needed = self.min_cells.get(label)
            if needed is not None and at_least >= needed:
                return label
        worst = severity[-1]
        mass = evidence.top_class_mass
        others = [mass.get(label, 0.0) for label in severity[1:-1]]
        return "ASC-H" if mass.get(worst, 0.0) > max(others, default=0.0) else "ASC-US"

    def to_yaml(self) -> str:
        """The operating point as `slide_call.yaml`, each number with its meaning."""

        def flow(value: Any) -> str:
            return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=88).strip()

        lines = [
            "# The slide call for the models in this repository (worker/pipeline/slide_call.py).",
            f"version: {self.version}",
            "# What set these numbers: the scorecard's validation part, fields as slides.",
            f"fitted_on: {flow(self.fitted_on)}",
            "# Per preparation: calibrated score = 1 / (1 + exp(-(intercept + sum(coef_i *",
            "# logit(feature_i))))), features in this order:",
            f"# {', '.join(FEATURES)}; a slide is abnormal from abnormal_threshold",
            "# (sensitivity >= 0.95 on validation, with the best specificity that allows).",
            "rules:",
        ]
        for prep, rule in self.rules.items():
            lines += [
                f"  {prep}:",
                f"    coef: [{', '.join(f'{c:.6g}' for c in rule.coef)}]",
                f"    intercept: {rule.intercept:.6g}",
                f"    abnormal_threshold: {rule.abnormal_threshold:.6g}",
                f"    fitted_on: {flow(rule.fitted_on)}",
            ]
        lines += [
            "# A cell is confident evidence of its class from this probability.",
            f"cell_confidence: {self.cell_confidence:.6g}",
            "# Confident cells of a class (or worse) that grade an abnormal slide so;"
            " fewer: ASC-US / ASC-H.",
            f"min_cells: {flow(self.min_cells)}",
            "# The share of cells and ROIs the top features average; cells averaged at least;"
            " cells an ROI needs for its abnormal probability to count.",
            f"top_fraction: {self.top_fraction:.6g}",
            f"top_n: {self.top_n}",
            f"roi_min_cells: {self.roi_min_cells}",
        ]
        return "\n".join(lines) + "\n"


def _why_unsatisfactory(evidence: SlideEvidence, minimum: int, preparation: str) -> str:
    if evidence.roi_count == 0:
        return "no cellular area was found on the slide (blank glass, or not a cytology slide)."
    if evidence.cell_count == 0:
        return f"no cells were found in its {evidence.roi_count} cellular ROIs."
    return (
        f"scant cellularity: about {evidence.cell_count} cells, under the {minimum}"
        f" a {preparation} preparation needs."
    )


def _logit(p: float) -> float:
    p = min(1.0 - _EPS, max(_EPS, p))
    return math.log(p / (1.0 - p))
