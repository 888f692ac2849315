"""``ckpt.pt``: config + state_dict + labels + costs, plain types only.

Loaded with ``torch.load(weights_only=True)``: a file holding pickled objects is refused
without running them. The config travels with the weights, so nothing is re-guessed.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hms_deploy.config import HMSConfig
from hms_deploy.errors import CheckpointError, ConfigError, WeightsError, first_line
from hms_deploy.version import __version__

if TYPE_CHECKING:
    from hms_deploy.model.hms import HMS

FORMAT = "hms-deploy-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """An HMS checkpoint in memory.

    ``policy`` is ``"hms"`` for the gated model, ``"early_fusion"`` for a baseline (whose
    ``modalities`` lists the fused subset, e.g. ``["audio", "appearance"]``); only ``hms``
    checkpoints can be exported and run. ``extra`` holds training metadata (plain types).
    """

    config: HMSConfig
    state_dict: dict[str, torch.Tensor]
    labels: list[str]
    costs: dict[str, float]
    policy: str = "hms"
    modalities: list[str] = field(default_factory=lambda: ["audio", "appearance", "motion"])
    extra: dict[str, Any] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "hms_deploy_version": __version__,
            "config": self.config.to_dict(),
            "state_dict": self.state_dict,
            "labels": list(self.labels),
            "costs": dict(self.costs),
            "cost_unit": "GMAC",
            "policy": self.policy,
            "modalities": list(self.modalities),
            "extra": self.extra,
        }

    def build_model(self) -> HMS:
        """The HMS model with these weights, in eval mode."""
        if self.policy != "hms":
            raise CheckpointError(
                f"checkpoint holds a {self.policy!r} baseline, not an HMS model; "
                "baselines can be evaluated (hms-eval) but not exported or run"
            )
        from hms_deploy.model.hms import HMS

        model = HMS(self.config)
        missing, unexpected = model.load_state_dict(self.state_dict, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint weights do not fit its config: {len(missing)} missing "
                f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
            )
        return model.eval()


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike[str]) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves a torn checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(ckpt.to_payload(), tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load a checkpoint; every failure is a :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    payload = safe_torch_load(path, CheckpointError, "checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an hms-deploy checkpoint (no '{FORMAT}' header)")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {payload['format_version']} is newer than this "
            f"hms-deploy supports ({FORMAT_VERSION}); upgrade hms-deploy"
        )
    try:
        config = HMSConfig.from_dict(payload["config"])
        return Checkpoint(
            config=config,
            state_dict=payload["state_dict"],
            labels=list(payload["labels"]),
            costs={k: float(v) for k, v in payload["costs"].items()},
            policy=payload.get("policy", "hms"),
            modalities=list(payload.get("modalities", ["audio", "appearance", "motion"])),
            extra=dict(payload.get("extra", {})),
        )
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path}: malformed checkpoint ({e})") from None


# --------------------------------------------------------------------- pretrained weights


def safe_torch_load(path: Path, error: type[Exception], what: str) -> Any:
    """``torch.load(weights_only=True)``; pickled objects are refused without running them.

    A file that asks to import a global (a class, a function) is refused as "holds
    pickled objects"; a file that is neither of ``torch.save``'s formats (a zip archive, or
    a pickle: text, for instance) is "not a <what>"; anything else unreadable is "not a
    readable <what>".
    """
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise error(f"{path}: not a readable {what} ({first_line(e, typed=False, limit=160)})") from None
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        kind = ("empty" if not head else "text" if _is_text(head)
                else "another kind of file")
        raise error(f"{path}: not a {what} (it is {kind}, not a file written by torch.save)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        glob = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), None)
        if glob:
            raise error(
                f"{path}: refused: the file holds pickled objects that weights_only loading "
                f"does not allow ({glob[:160]})"
            ) from None
        raise error(f"{path}: not a readable {what} (corrupt pickle data)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError,
            KeyError, AttributeError, TypeError) as e:
        raise error(f"{path}: not a readable {what} ({first_line(e, typed=False, limit=160)})") from None


def _is_text(chunk: bytes) -> bool:
    """``chunk`` (a file's first 4 KiB) decodes as UTF-8 and holds no NUL byte."""
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in chunk


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad weights file
            raise WeightsError(f"{path}: not a readable weights file ({first_line(e, typed=False, limit=160)})") from None
    else:
        obj = safe_torch_load(path, WeightsError, "weights file")
    # timm: plain state dict or {'state_dict'|'model'|'state_dict_ema': ...};
    # pytorchvideo .pyth: {'model_state': ...}
    for key in ("model_state", "state_dict_ema", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: no state dict of tensors found")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _classifier_prefixes(net: nn.Module) -> tuple[str, ...]:
    cfg = getattr(net, "pretrained_cfg", None) or {}
    heads = [cfg.get("classifier")] if cfg.get("classifier") else []
    return tuple(f"{h}." for h in heads) + ("blocks.6.proj.", "fc.", "classifier.", "head.fc.")


def load_backbone_weights(net: nn.Module, path: str | os.PathLike[str], *, what: str) -> None:
    """Load pretrained weights into a backbone net (timm model or SlowFast), in place.

    Classifier weights are dropped (the backbone ends at its pooled feature). A 3-channel
    first conv is adapted to a 1-channel net by summing over input channels, which is what
    timm's ``adapt_input_conv`` does for ``in_chans=1``. Keys and shapes must match
    exactly; otherwise :class:`WeightsError` says how many did not and gives examples.
    """
    path = Path(path)
    sd = _read_state_dict(path)
    own = net.state_dict()
    drop = _classifier_prefixes(net)
    sd = {k: v for k, v in sd.items() if not (k.startswith(drop) and k not in own)}
    first_conv = (getattr(net, "pretrained_cfg", None) or {}).get("first_conv")
    if first_conv and f"{first_conv}.weight" in sd and f"{first_conv}.weight" in own:
        key = f"{first_conv}.weight"
        w, want = sd[key], own[key]
        if w.ndim == 4 and w.shape[1] != want.shape[1] and want.shape[1] == 1:
            from timm.models._manipulate import adapt_input_conv

            sd[key] = adapt_input_conv(1, w)
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise WeightsError(
            f"{path}: does not fit the {what} backbone: {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
            f"{len(mismatched)} with wrong shapes (e.g. {mismatched[:2]})"
        )
    net.load_state_dict(sd, strict=True)


def init_checkpoint(
    config: HMSConfig,
    *,
    labels: list[str] | None = None,
    weights: dict[str, str | os.PathLike[str] | None] | None = None,
    seed: int = 0,
) -> Checkpoint:
    """An untrained checkpoint (random-init heads, optionally pretrained backbones)."""
    from hms_deploy.costs import measure_part_costs
    from hms_deploy.model.hms import HMS

    if labels is None:
        labels = [f"class_{i}" for i in range(config.num_classes)]
    if len(labels) != config.num_classes:
        raise ConfigError(
            f"labels file has {len(labels)} classes, but num_classes is {config.num_classes}",
            setting="num_classes", value=config.num_classes, expected=str(len(labels)),
        )
    if len(set(labels)) != len(labels):
        raise ConfigError("labels must be unique")
    torch.manual_seed(seed)
    model = HMS(config)
    for modality, wpath in (weights or {}).items():
        if wpath:
            net = getattr(model, f"{modality}_backbone").encoder.net
            load_backbone_weights(net, wpath, what=f"{modality} ({config.backbone(modality).arch})")
    model.eval()
    return Checkpoint(
        config=config,
        state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
        labels=list(labels),
        costs=measure_part_costs(model),
    )


def read_labels(path: str | os.PathLike[str]) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: labels file not found")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
