"""The papers' training protocols as named, frozen presets.

Each preset holds what its paper states (split, input size, augmentation, optimiser,
schedule, epochs, batch) and names what the paper left unsaid in `notes`, together with
the value papscan chose for it. A run may override a few fields (`with_overrides`); the
run folder records both the final values and which ones were overridden.

    >>> p = get_protocol("su2021").with_overrides(epochs=2, limit=40)
    >>> p.epochs, p.overrides
    (2, (('epochs', 2), ('limit', 40)))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

SplitKind = Literal["kfold", "ratio"]
OptimizerName = Literal["sgd", "adam", "adamw"]
ScheduleName = Literal["constant", "step", "cosine"]
Augmentation = Literal["none", "flips4", "hflip"]

# Fields a run may change; everything else is the paper's.
OVERRIDABLE = ("epochs", "input_px", "batch", "folds", "lr", "limit")


@dataclass(frozen=True)
class Protocol:
    """One paper's training protocol.

    Attributes:
        name: Preset name (`000`, `001`, `002`, `004`).
        paper: The paper's file in shared/papers.
        title: The paper's short title.
        task: `cells` (one image, one class) or `rois` (a bag of cells, one class).
        default_arch: The paper's architecture (registered model name).
        default_data: The paper's dataset spec (`train.data.catalog`).
        split: `kfold` (stratified k-fold cross-validation, no validation split) or
            `ratio` (one train/val/test split; val selects the epoch).
        folds: k of `kfold`.
        fractions: (train, val, test) shares of `ratio`.
        input_px: Side of the square network input, px.
        augmentation: `flips4` (every training image also appears flipped horizontally,
            vertically and both ways: 4x the set, each epoch), `hflip` (random horizontal
            flip, p = 0.5), or `none`.
        batch: Items per batch.
        optimizer: `sgd`, `adam` or `adamw`.
        lr: Initial learning rate.
        momentum: SGD momentum (unused by Adam/AdamW).
        weight_decay: Weight decay (L2 for SGD/Adam, decoupled for AdamW).
        schedule: `constant`, `step` (lr x `gamma` every `step_epochs`) or `cosine` (to 0
            over the run, stepped per epoch).
        step_epochs: Period of the `step` schedule, epochs.
        gamma: Factor of the `step` schedule.
        epochs: Training epochs.
        reports: The figures the paper reports.
        notes: What the paper does not state, and what papscan chose for it.
        limit: At most this many items in each split of each fold (smoke runs), or None.
        overrides: (field, value) pairs changed from the paper's preset.
    """

    name: str
    paper: str
    title: str
    task: Literal["cells", "rois"]
    default_arch: str
    default_data: str
    split: SplitKind
    folds: int
    fractions: tuple[float, float, float]
    input_px: int
    augmentation: Augmentation
    batch: int
    optimizer: OptimizerName
    lr: float
    momentum: float
    weight_decay: float
    schedule: ScheduleName
    step_epochs: int
    gamma: float
    epochs: int
    reports: tuple[str, ...]
    notes: str
    limit: int | None = None
    overrides: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.split == "kfold" and self.folds < 2:
            raise ValueError(f"protocol {self.name}: k-fold needs at least 2 folds")
        if self.split == "ratio" and abs(sum(self.fractions) - 1.0) > 1e-6:
            raise ValueError(f"protocol {self.name}: split fractions must sum to 1")
        for field in ("epochs", "input_px", "batch"):
            if getattr(self, field) < 1:
                raise ValueError(f"protocol {self.name}: {field} must be at least 1")
        if self.lr <= 0:
            raise ValueError(f"protocol {self.name}: lr must be positive")
        if self.limit is not None and self.limit < 2:
            raise ValueError(f"protocol {self.name}: limit must be at least 2 items")

    def with_overrides(self, **changes: Any) -> Protocol:
        """A copy with some fields changed (None values are ignored), recorded in `overrides`.

        Args:
            **changes: Any of `epochs`, `input_px`, `batch`, `folds`, `lr`, `limit`.

        Raises:
            ValueError: An unknown field, or `folds` on a protocol without k-fold.
        """
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = sorted(set(changes) - set(OVERRIDABLE))
        if unknown:
            raise ValueError(f"cannot override {unknown}; overridable: {', '.join(OVERRIDABLE)}")
        if "folds" in changes and self.split != "kfold":
            raise ValueError(f"protocol {self.name} uses a {self.fractions} split, not k-fold")
        recorded = dict(self.overrides)
        recorded.update(changes)
        return dataclasses.replace(self, **changes, overrides=tuple(recorded.items()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (as run.json's `protocol`); `overrides` becomes a mapping."""
        d = dataclasses.asdict(self)
        d["fractions"] = list(self.fractions)
        d["reports"] = list(self.reports)
        d["overrides"] = dict(self.overrides)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Protocol:
        """Inverse of `to_dict` (reads run.json's `protocol`)."""
        d = dict(d)
        d["fractions"] = tuple(d["fractions"])
        d["reports"] = tuple(d["reports"])
        d["overrides"] = tuple(d.get("overrides", {}).items())
        return cls(**d)


SU2021 = Protocol(
    name="000",
    paper="000_d19e9f605dfeb994.txt",
    title="Su et al., Cervical Cell Image Classification Based On Multiple Attention Fusion",
    task="cells",
    default_arch="se_sam_dnl_resnet50",
    default_data="sipakmed",
    split="kfold",
    folds=5,
    fractions=(0.8, 0.0, 0.2),
    input_px=80,
    augmentation="flips4",
    batch=48,
    optimizer="sgd",
    lr=0.01,
    momentum=0.9,
    weight_decay=1e-4,
    schedule="cosine",
    step_epochs=0,
    gamma=1.0,
    epochs=80,
    reports=("accuracy mean ± std over 5 folds",),
    notes="The paper gives SGD, batch 48 and 80 epochs but no learning rate, momentum, weight "
    "decay or schedule: papscan uses lr 0.01, momentum 0.9, weight decay 1e-4, cosine decay.",
)

WANG2021 = Protocol(
    name="001",
    paper="001_e26595dff0242cd0.txt",
    title="Wang et al., Towards Interpretable Attention Networks for Cervical Cancer Analysis",
    task="cells",
    default_arch="rcan_densenet121",
    default_data="sipakmed",
    split="ratio",
    folds=1,
    fractions=(0.7, 0.2, 0.1),
    input_px=224,
    augmentation="none",
    batch=16,
    optimizer="adam",
    lr=1e-3,
    momentum=0.0,
    weight_decay=0.0,
    schedule="constant",
    step_epochs=0,
    gamma=1.0,
    epochs=50,
    reports=("test accuracy", "weighted F1", "per-class F1"),
    notes="Adam with default parameters otherwise (no weight decay, constant lr). The paper "
    "gives no input size or augmentation: papscan uses 224x224 (DenseNet's) and none; the "
    "epoch with the best validation accuracy is kept.",
)

SHI2021 = Protocol(
    name="002",
    paper="002_9ffaad4266315e55.txt",
    title="Shi et al., Global-Local Attention Network for Weakly Supervised Cervical "
    "Cytology ROI Analysis",
    task="rois",
    default_arch="global_local_roi",
    default_data="lbc",
    split="kfold",
    folds=5,
    fractions=(0.8, 0.0, 0.2),
    input_px=224,
    augmentation="none",
    batch=8,
    optimizer="sgd",
    lr=3e-4,
    momentum=0.9,
    weight_decay=1e-4,
    schedule="step",
    step_epochs=30,
    gamma=0.1,
    epochs=90,
    reports=("ROI accuracy",),
    notes="The paper gives SGD, 90 epochs, lr 3e-4 divided by 10 every 30 epochs, cells "
    "resized to 224 and lambda 0.25, but no batch, momentum, weight decay or split: papscan "
    "uses batch 8 ROIs, momentum 0.9, weight decay 1e-4 and 5-fold cross-validation.",
)

LIU2022 = Protocol(
    name="004",
    paper="004_f065bcbeb670a7ac.txt",
    title="Liu et al., CVM-Cervix: A Hybrid Cervical Pap-Smear Image Classification Framework",
    task="cells",
    default_arch="cvm_cervix",
    default_data="sipakmed+cric",
    split="ratio",
    folds=1,
    fractions=(0.6, 0.2, 0.2),
    input_px=224,
    augmentation="hflip",
    batch=16,
    optimizer="adamw",
    lr=2e-4,
    momentum=0.0,
    weight_decay=0.01,
    schedule="constant",
    step_epochs=0,
    gamma=1.0,
    epochs=100,
    reports=("test precision", "recall", "F1", "accuracy"),
    notes="AdamW's weight decay and the schedule are not given: papscan uses PyTorch's "
    "default decay (0.01) and a constant lr; the epoch with the best validation accuracy "
    "is kept.",
)

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (SU2021, WANG2021, SHI2021, LIU2022)}
ALIASES: dict[str, str] = {"su2021": "000", "wang2021": "001", "shi2021": "002", "liu2022": "004"}


def get_protocol(name: str) -> Protocol:
    """The preset called `name` (`000`, `001`, `002`, `004`, or an alias such as `su2021`).

    Raises:
        ValueError: No such preset.
    """
    key = ALIASES.get(name.lower(), name)
    if key not in PROTOCOLS:
        known = ", ".join([*PROTOCOLS, *ALIASES])
        raise ValueError(f"unknown protocol {name!r}; known: {known}")
    return PROTOCOLS[key]
