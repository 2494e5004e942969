"""Training stage: the loop (loop.py, read top to bottom), its settings (config.py), the
data and targets it trains on (data.py), checkpoints and resuming (checkpoints.py) and
torchrun ranks (ranks.py). Names are imported on first use: the settings need no torch."""

from histoscreen.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("BALANCE_CHOICES", "TrainConfig"), "histoscreen.training.config"),
    **dict.fromkeys(("TrainingData", "load_training_data", "teacher_logits"), "histoscreen.training.data"),
    **dict.fromkeys(("TrainResult", "build_model", "evaluate_logits", "finalise", "learning_rate_at", "train", "train_one_epoch"),
                    "histoscreen.training.loop"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
