"""How a model's logits become calls: the settings fitted on calibration patients (a
temperature, bias and threshold per scoring mode, the slide context) and how they did.

Plain, checked records (numpy-free even): the model bundle stores them in its JSON, the
scoring stage fits and applies them. Every value is checked when a record is made, so a
model file with a NaN temperature or a threshold of 1 is refused on load, naming the field.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from histoscreen.errors import ModelError

# How a patch is scored: alone or blended with its neighbours on the slide (context), from
# one view or the mean of the 8 dihedral views (TTA). Each mode has its own calibration.
SCORING_MODES = ("plain", "tta", "context_plain", "context_tta")


def scoring_mode(*, tta: bool, context: bool) -> str:
    return ("context_" if context else "") + ("tta" if tta else "plain")


# Bounds on fitted scoring values: far past anything a fit gives, well short of where float
# arithmetic overflows or underflows (a bias of 1e308 or a temperature of 1e-320 is finite
# and turns every logit into inf or NaN).
MAX_TEMPERATURE, MIN_TEMPERATURE = 1e3, 1e-3
MAX_ABS_BIAS = 1e4
MAX_ABS_CONTEXT_WEIGHT = 1e6


def finite_number(name: str, value: object, bound: float = 1e12) -> float:
    """`value` as a float, refused (ValueError naming it) unless a finite number within +/-`bound`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if abs(value) > bound:
        raise ValueError(f"{name} must lie within +/-{bound:g}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Calibration:
    """prob_idc = sigmoid(logit / temperature + bias); IDC when prob_idc >= threshold."""

    temperature: float = 1.0
    bias: float = 0.0
    threshold: float = 0.5

    def __post_init__(self) -> None:
        for name, bound in (("temperature", MAX_TEMPERATURE), ("bias", MAX_ABS_BIAS), ("threshold", 1e12)):
            object.__setattr__(self, name, finite_number(name, getattr(self, name), bound))
        if not MIN_TEMPERATURE <= self.temperature:
            raise ValueError(f"temperature must lie between {MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g}, got {self.temperature}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must lie strictly between 0 and 1, got {self.threshold}")

    def calibrated(self, logits):
        """Calibrated logits (numpy arrays or floats)."""
        return logits / self.temperature + self.bias


@dataclass(frozen=True)
class ContextSettings:
    """Slide context (scoring/context.py): how far to look and how much to trust the
    neighbours; with `linear`, the learned context's weights (intercept last), which then
    replace the blend."""

    radius: int
    weight: float
    linear: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.radius, bool) or not isinstance(self.radius, int) or not 1 <= self.radius <= 10:
            raise ValueError(f"radius must be a whole number of grid steps from 1 to 10, got {self.radius!r}")
        weight = finite_number("weight", self.weight)
        if not 0 <= weight <= 1:
            raise ValueError(f"weight must lie between 0 and 1, got {weight}")
        object.__setattr__(self, "weight", weight)
        if self.linear is not None:
            if not isinstance(self.linear, (list, tuple)) or len(self.linear) < 2:
                raise ValueError(f"linear must be a list of weights, intercept last, got {self.linear!r}")
            object.__setattr__(self, "linear", tuple(finite_number("linear weight", w, MAX_ABS_CONTEXT_WEIGHT) for w in self.linear))


@dataclass(frozen=True)
class Scoring:
    """Everything fitted on val patients that turns a model's logits into calls."""

    plain: Calibration = Calibration()
    tta: Calibration = Calibration()
    context: ContextSettings | None = None
    context_plain: Calibration | None = None
    context_tta: Calibration | None = None

    def __post_init__(self) -> None:
        parts = (self.context, self.context_plain, self.context_tta)
        if any(p is None for p in parts) and any(p is not None for p in parts):
            raise ValueError("context, context_plain and context_tta go together: all or none")

    @property
    def has_context(self) -> bool:
        return self.context is not None

    def calibration(self, mode: str) -> Calibration:
        found = getattr(self, mode)
        if found is None:
            raise ModelError(f"this model has no {mode} calibration")
        return found

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict) -> Scoring:
        if not isinstance(payload, dict):
            raise ValueError(f"scoring must be an object, got {type(payload).__name__}")
        unknown = set(payload) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"scoring has unknown entries {sorted(unknown)}")
        parts: dict = {}
        for name, value in payload.items():
            if value is None:
                parts[name] = None
                continue
            if not isinstance(value, dict):
                raise ValueError(f"scoring.{name} must be an object, got {type(value).__name__}")
            kind = ContextSettings if name == "context" else Calibration
            try:
                parts[name] = kind(**value)
            except TypeError:
                raise ValueError(f"scoring.{name} has entries {sorted(value)}, expected {[f.name for f in fields(kind)]}") from None
            except ValueError as error:
                raise ValueError(f"scoring.{name}.{error}") from None
        return cls(**parts)


@dataclass(frozen=True)
class Validation:
    """How the scoring did on the val patients it was fitted on, and how it carries over
    (leaving one of them out at a time)."""

    threshold_rule: str
    metrics: dict[str, dict]  # by scoring mode: classification_metrics at the fitted threshold
    leave_one_patient_out: dict[str, dict] = field(default_factory=dict)  # by "plain"/"tta"
    split: str | None = None
    patients: tuple[str, ...] = ()
    store: str | None = None
    # how the scoring was fitted, to refit it the same way: {"threshold_rule": ThresholdRule
    # fields, "context_model": "blend" | "learned"} (absent from models made before)
    procedure: dict | None = None
    # calibrated on a lab's own patients: the figures there of the model it started from
    # ("before") and of this refit, each patient called by a fit on the others ("after")
    estimate: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict) -> Validation:
        if not isinstance(payload, dict) or not isinstance(payload.get("metrics"), dict):
            raise ValueError("validation must be an object with metrics by scoring mode")
        procedure = payload.get("procedure")
        if procedure is not None and not (
            isinstance(procedure, dict) and isinstance(procedure.get("threshold_rule"), dict)
            and procedure.get("context_model") in ("blend", "learned", None)
        ):
            raise ValueError("validation.procedure must name a threshold_rule object and a context_model (blend or learned)")
        estimate = payload.get("estimate")
        if estimate is not None and not (isinstance(estimate, dict) and {"before", "after"} <= set(estimate)):
            raise ValueError("validation.estimate must be an object with 'before' and 'after' figures")
        return cls(**{**payload, "patients": tuple(payload.get("patients", ()))})
