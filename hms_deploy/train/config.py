"""The settings of training (``hms-train``) and of backbone fine-tuning (``hms-finetune``):
defaults and checks, declared once. The commands' flags default to None and take these
defaults (shown in their ``--help``); the module imports nothing heavy, so ``--help``
does not load torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hms_deploy.config import MODALITIES
from hms_deploy.errors import ConfigError, require_at_least

POLICIES = ("hms", "early_fusion")
FINETUNE_HEADS = ("joint", "separate")
FINETUNE_SCHEDULES = ("cosine", "constant")
VAL_FRACTION = 0.2  # held out for validation when no validation set is given
HMS_ONLY = ("tau", "tau_decay", "lam", "gamma_i", "gamma_m")  # settings of the gates
EARLY_FUSION_ONLY = ("modalities", "hidden")


def check_val_fraction(value: float) -> None:
    """The fraction of the training videos held out for validation is in (0, 1)."""
    if not 0.0 < value < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {value}", setting="val_fraction",
                          value=value)


def held_out_fraction(val_fraction: float | None, validation_set: object, setting: str
                      ) -> float | None:
    """The fraction of the training videos to hold out for validation (``val_fraction``,
    None: :data:`VAL_FRACTION`), checked; None when a validation set is given
    (``validation_set``, the setting ``setting``), beside which a val_fraction is refused."""
    if validation_set is not None:
        if val_fraction is not None:
            raise ConfigError(f"val_fraction applies when no {setting} is given",
                              setting=("val_fraction", setting))
        return None
    value = VAL_FRACTION if val_fraction is None else val_fraction
    check_val_fraction(value)
    return value


def _refuse_foreign(policy: str, names: list[str]) -> None:
    """Settings ``names`` given to a policy that does not have them: refused, not ignored."""
    if names:
        raise ConfigError(f"{', '.join(names)}: not a setting of policy {policy}",
                          setting=(*names, "policy"), value=policy)


@dataclass
class TrainConfig:
    """Hyper-parameters of ``hms-train`` (defaults: docs/method.md §4; a preset of
    :mod:`hms_deploy.train.presets` replaces epochs, lr, lr_decay, lam and gamma_m)."""

    policy: str = "hms"
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-4
    lr_decay: float = 0.92  # lr multiplier after every epoch
    tau: float = 5.0  # Gumbel-softmax temperature of the first epoch
    tau_decay: float = 0.965  # temperature multiplier after every epoch
    lam: float = 2.0  # weight of the usage loss
    gamma_i: float = 0.6  # target fraction of steps that run appearance
    gamma_m: float = 0.05  # target fraction of steps that run motion
    val_fraction: float = VAL_FRACTION
    seed: int = 0
    hidden: int | None = None  # early fusion: LSTM width (default H_M)
    weight_decay: float = 0.0

    @classmethod
    def from_settings(cls, settings: dict[str, Any], base: dict[str, Any] | None = None
                      ) -> TrainConfig:
        """The checked config of ``settings`` (those a user gave) over ``base`` (a preset's
        values) over the defaults. A given setting that does not apply to the policy
        (:data:`HMS_ONLY`, :data:`EARLY_FUSION_ONLY`) is refused, not ignored."""
        policy = settings.get("policy", cls.policy)
        _refuse_foreign(policy, [n for n in (EARLY_FUSION_ONLY if policy == "hms" else HMS_ONLY)
                                 if n in settings])
        cfg = cls(**{**(base or {}), **settings})
        cfg.check()
        return cfg

    def check(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"policy {self.policy!r}, expected one of {POLICIES}",
                              setting="policy", value=self.policy)
        if self.policy == "hms":  # HMS runs A+I+M with its own widths
            _refuse_foreign("hms", [n for n, other in (
                ("modalities", list(self.modalities) != list(MODALITIES)),
                ("hidden", self.hidden is not None)) if other])
        for name in ("epochs", "batch_size", "hidden"):
            require_at_least(name, getattr(self, name), 1)
        for name in ("lr", "lr_decay", "tau", "tau_decay"):
            require_at_least(name, getattr(self, name), 0, strict=True)
        for name in ("lam", "weight_decay"):
            require_at_least(name, getattr(self, name), 0)
        for name in ("gamma_i", "gamma_m"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}",
                                  setting=name, value=getattr(self, name))
        check_val_fraction(self.val_fraction)


@dataclass
class FinetuneConfig:
    """Which encoders to fine-tune and how: single-step inputs, Adam (docs/method.md §8).

    The defaults are the recipe of ``hms-finetune`` and of the synthetic quality study
    (``benchmarks/synthetic_quality.py``; its results, ``finetune_val_step_accuracy``,
    are in ``benchmarks/results/synthetic_quality.json``):

    - a linear probe first (``probe_epochs``, LP-FT), so the encoder's first updates go to
      the classes the initial features cannot tell apart, and ``focus`` sampling can
      start at once;
    - cosine decay of ``lr`` over ``epochs``, early stopping on validation step accuracy
      (``patience`` epochs without a better one, or ``stop_accuracy`` reached), the best
      epoch's weights kept, so the epoch count adapts to the data;
    - a try that ends below ``restart_below`` is tried again (``restarts`` times) from a
      new random initialisation (``tiny``; other variants from their given weights), the
      better try kept;
    - after training, BatchNorm statistics are recomputed ("precise BN"), since running
      averages lag the weights;
    - ``augment``: colour jitter of the trained visual encoders' inputs
      (:func:`~hms_deploy.train.step_classifier.colour_jitter`), against shortcuts
      through colour on small sets.
    """

    modalities: list[str] = field(default_factory=lambda: ["motion"])
    epochs: int = 10  # at most; early stopping usually ends sooner
    steps_per_video: int = 4  # random steps drawn per video and epoch
    batch_size: int = 8
    lr: float = 3e-3
    schedule: str = "cosine"  # "cosine": lr * (1 + cos(pi * update / updates)) / 2; "constant"
    warmup_epochs: float = 0.0  # linear lr warm-up over this many epochs (then the schedule)
    probe_epochs: int = 30  # fit the classifier alone first (LP-FT), 0: start from a random one
    restarts: int = 1  # tries again (see finetune._restart) while the kept val step accuracy
    restart_below: float = 0.9  # is below this; the best try is kept
    patience: int = 3  # stop after this many epochs without a better val step accuracy
    stop_accuracy: float = 0.97  # ... or once val step accuracy reaches this
    seed: int = 0
    workers: int = 1  # decoding processes; 0 decodes in this process
    bn_recalibration_steps: int = 2  # random steps per video for the final BatchNorm statistics
    head: str = "joint"  # "joint": one classifier over all three modalities' features;
    #                      "separate": one classifier per fine-tuned modality, on its own
    augment: bool = True  # colour jitter of the trained visual encoders' inputs
    focus: bool = True  # after the first epoch, draw videos of class c with probability
    #                     proportional to max(1 - train accuracy of c, 0.05)

    def check(self) -> None:
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad or not self.modalities:
            raise ConfigError(f"fine-tune modalities {self.modalities}: expected names from "
                              f"{MODALITIES}", setting="modalities", value=self.modalities)
        if self.head not in FINETUNE_HEADS:
            raise ConfigError(f"fine-tune head {self.head!r}, expected one of {FINETUNE_HEADS}",
                              setting="head", value=self.head)
        if self.schedule not in FINETUNE_SCHEDULES:
            raise ConfigError(f"fine-tune schedule {self.schedule!r}, expected one of "
                              f"{FINETUNE_SCHEDULES}", setting="schedule", value=self.schedule)
        for name in ("epochs", "steps_per_video", "batch_size", "patience"):
            require_at_least(name, getattr(self, name), 1)
        require_at_least("lr", self.lr, 0, strict=True)
        for name in ("warmup_epochs", "probe_epochs", "restarts", "workers",
                     "bn_recalibration_steps"):
            require_at_least(name, getattr(self, name), 0)
