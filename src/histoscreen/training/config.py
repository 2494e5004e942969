"""A training run's settings, checked where they are made; nothing here imports torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from histoscreen.checks import choice, number, whole_number
from histoscreen.data.splits import SplitSpec
from histoscreen.errors import SettingError
from histoscreen.models.registry import check_architecture_kwargs
from histoscreen.scoring.calibration import ThresholdRule

BALANCE_CHOICES = ("weighted", "sampler", "none")


@dataclass
class TrainConfig:
    architecture: str = "compact"
    architecture_kwargs: dict = field(default_factory=dict)
    epochs: int = 20
    batch_size: int = 256
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    balance: str = "weighted"  # weighted loss, balanced sampling, or neither
    stain_jitter: float = 0.05  # HED scale and shift; 0 turns stain and colour jitter off
    # IDC regions were outlined at low magnification, so labels near a region's border are
    # the least sure: train on (1 - s) * label + s * (mean label of the 8 neighbours).
    # Targets only, never inputs; 0 trains on the labels as they are.
    border_smoothing: float = 0.0
    # Distillation: train on (1 - w) * target + w * the teachers' probability, the sigmoid of
    # their mean logit over the 8 dihedral views (an ensemble taught to one CPU-fast network).
    teachers: list[str] = field(default_factory=list)
    distil_weight: float = 0.0
    seed: int = 0
    split: SplitSpec = field(default_factory=SplitSpec)
    threshold_rule: ThresholdRule = field(default_factory=ThresholdRule)
    max_train_patches: int | None = None  # a seeded subsample, for quick runs
    device: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.split, dict):  # a config read back from JSON
            self.split = SplitSpec(**self.split)
        if isinstance(self.threshold_rule, dict):
            self.threshold_rule = ThresholdRule(**self.threshold_rule)
        choice("balance", self.balance, BALANCE_CHOICES)
        for name in ("epochs", "batch_size"):
            whole_number(name, getattr(self, name))
        for name in ("border_smoothing", "distil_weight"):
            number(name, getattr(self, name), low=0, high=1)
        whole_number("seed", self.seed, low=0)
        number("learning_rate", self.learning_rate, low=0, low_open=True)
        for name in ("weight_decay", "warmup_epochs", "stain_jitter"):
            number(name, getattr(self, name), low=0)
        if bool(self.teachers) != (self.distil_weight > 0):
            raise SettingError("distil_weight", "distillation needs both teacher models and a weight above 0")
        if self.max_train_patches is not None:
            whole_number("max_train_patches", self.max_train_patches)
        if not isinstance(self.architecture_kwargs, dict):
            raise SettingError("architecture_kwargs", f"must be an object of options, got {self.architecture_kwargs!r}")
        check_architecture_kwargs(self.architecture_kwargs)
