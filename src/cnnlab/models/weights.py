"""Starting weights from a file: a path, or a URL with a pinned checksum downloaded once into the cache."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from cnnlab.data.download import download
from cnnlab.errors import ConfigError
from cnnlab.models.registry import fitting_tensors


def weights_file(source: str, cache_root: Path) -> Path:
    """A weights file on disk: `source` itself, or a URL with a pinned checksum (`...#sha256=<64 hex digits>`)
    downloaded once into the cache and verified."""
    if not source.startswith(("http://", "https://")):
        return Path(source).expanduser()
    url, _, pin = source.partition("#sha256=")
    if len(pin) != 64 or any(c not in "0123456789abcdef" for c in pin.lower()):
        raise ConfigError(
            "train.weights by URL needs its SHA-256 pinned: https://.../file.safetensors#sha256=<64 hex digits>",
            "train.weights",
        )
    return download(url, cache_root / "weights" / f"{pin.lower()}.safetensors", sha256=pin.lower())


def load_compatible_weights(model: nn.Module, path: Path) -> None:
    """Every tensor of a safetensors file that fits the model by name and shape (a classifier for another number
    of classes is left as initialised); refuse a file that fits nothing else."""
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        message = f"{path}: not a readable safetensors file for train.weights ({error})"
        raise ConfigError(message, "train.weights") from None
    fitting, left = fitting_tensors(model, weights)
    if len(left) > 2:  # at most a classifier's weight and bias may differ
        raise ConfigError(
            f"{path}: its weights do not fit this model ({len(left)} of {len(model.state_dict())} tensors missing "
            f"or of another shape, first {left[0]}); train.weights needs a file of the same architecture",
            "train.weights",
        )
    model.load_state_dict(fitting, strict=False)
