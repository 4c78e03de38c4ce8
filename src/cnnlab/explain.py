"""What a convolutional model looked at: Grad-CAM, the feature maps of every conv layer, first-layer filters.

Grad-CAM (Selvaraju et al., 2017) weighs each channel of the last convolution's output by the mean
gradient of the class score with respect to it, keeps the positive part of the weighted sum, and
stretches that coarse map over the input image.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab import figures
from cnnlab.atomic import write_text
from cnnlab.data.transforms import to_input
from cnnlab.errors import CnnlabError
from cnnlab.models import TrainedModel


@dataclass
class Explanation:
    target: str  # the class explained
    predicted: str
    probabilities: dict[str, float]
    heat: np.ndarray  # (H, W) in [0, 1], at the input's size
    feature_maps: dict[str, np.ndarray]  # conv layer name -> (K, h, w) activations
    first_filters: np.ndarray  # (K, kh, kw, 3) for RGB input, (K, kh, kw) for grayscale


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


def explain(model: TrainedModel, image: np.ndarray, class_name: str | None = None) -> Explanation:
    """Explain the model's view of one (H, W, C) uint8 image at its input size: of `class_name`, or of the class
    it answers most."""
    return explanations(model, image[None], [class_name])[0]


def explanations(model: TrainedModel, images: np.ndarray, class_names: Sequence[str | None]) -> list[Explanation]:
    """`explain` for each of (N, H, W, C) uint8 images and its class, the map's geometry measured once."""
    layers = conv_layers(model.module)
    target_layer = model.module.gradcam_layer()  # the family's choice
    if not layers or target_layer is None:
        raise CnnlabError(f"{model.info.architecture} has no convolutional layers to explain")
    if not any(layer is target_layer for _, layer in layers):
        layers.append(("grad-cam layer", target_layer))
    target_name = next(name for name, layer in layers if layer is target_layer)
    classes = model.info.classes
    for class_name in class_names:
        if class_name is not None and class_name not in classes:
            raise CnnlabError(f"unknown class {class_name!r}; the model's classes: {', '.join(classes)}")
    module = model.module.eval()
    first_conv = layers[0][1]
    assert isinstance(first_conv, nn.Conv2d)  # conv_layers lists the convolutions first
    first = first_conv.weight.detach().float().cpu()  # (K, C, kh, kw)
    centres, explained = None, []
    for image, class_name in zip(images, class_names, strict=True):
        x = to_input(torch.from_numpy(image[None]).to(next(module.parameters()).device), model.info.normalization)
        target = classes.index(class_name) if class_name else None
        logits, activations, cam = _grad_cam(module, layers, target_name, x, target)
        if centres is None:
            centres = receptive_field_centres(module, target_layer, x, (cam.shape[2], cam.shape[3]))
        cam = onto_input(cam, centres, image.shape[:2])
        cam = cam / cam.max() if cam.max() > 0 else cam
        probabilities = torch.sigmoid(logits) if model.info.multi_label else torch.softmax(logits, 0)
        explained.append(
            Explanation(
                target=classes[int(logits.argmax()) if target is None else target],
                predicted=classes[int(probabilities.argmax())],
                probabilities={name: float(p) for name, p in zip(classes, probabilities, strict=True)},
                heat=cam.cpu().numpy(),
                feature_maps={name: output[0].detach().float().cpu().numpy() for name, output in activations.items()},
                first_filters=first.permute(0, 2, 3, 1).numpy() if first.shape[1] == 3 else first[:, 0].numpy(),
            )
        )
    return explained


def _grad_cam(
    module: nn.Module, layers: list[tuple[str, nn.Module]], target_name: str, x: torch.Tensor, target: int | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """The (classes,) logits of one input, every conv layer's output, and the (1, 1, h, w) Grad-CAM map of class
    `target` (default: the top one) on the layer `target_name`."""
    activations: dict[str, torch.Tensor] = {}
    hooks = [
        layer.register_forward_hook(lambda _m, _i, output, name=name: activations.__setitem__(name, output))
        for name, layer in layers
    ]
    try:
        with torch.enable_grad():
            logits = module(x)[0]  # (classes,)
            last = activations[target_name]  # (1, K, h, w)
            (gradient,) = torch.autograd.grad(logits[int(logits.argmax()) if target is None else target], last)
    finally:
        for hook in hooks:
            hook.remove()
    weights = gradient.mean(dim=(2, 3), keepdim=True)  # (1, K, 1, 1): channel importance
    # The maps are taken after a ReLU, as Keras' conv layers (activation included) would give them;
    # for the tutorial CNN, whose ReLU runs after the pool, that is exactly what the next layer sees.
    cam = F.relu((weights * F.relu(last)).sum(1, keepdim=True)).detach()  # (1, 1, h, w)
    return logits.detach().float(), activations, cam


class _Captured(Exception):
    """Stops a forward pass once the layer of interest has run."""


def receptive_field_centres(
    module: nn.Module, layer: nn.Module, x: torch.Tensor, map_size: tuple[int, int]
) -> torch.Tensor:
    """Input (y, x) of the centres of the first and last cells of `layer`'s (h, w) output map for x: (2, 2).

    Valid convolutions and pools shrink a map towards the image's centre, so stretching it over the
    whole image would misplace it by pixels. The geometry is measured, not assumed: on a four-times
    larger random probe (run only up to `layer`), the centres of two middle cells, each the middle of
    the input region its gradient reaches, give the map's offset and stride.
    """
    height, width = x.shape[-2:]
    probe = torch.randn((4, x.shape[1], 4 * height, 4 * width), generator=torch.Generator().manual_seed(0))
    probe = probe.to(x).requires_grad_(True)
    captured: dict[str, torch.Tensor] = {}

    def capture(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        captured["map"] = output
        raise _Captured

    hook = layer.register_forward_hook(capture)
    try:
        with torch.enable_grad():
            module(probe)
    except _Captured:
        pass
    finally:
        hook.remove()
    cells = captured["map"]  # (4, K, h', w')
    if min(cells.shape[2:]) < 3:  # too coarse to measure two inner cells (a net that pools to a pixel or two)
        return _stretched(map_size, (height, width)).to(x.device)
    row, column = cells.shape[2] // 2, cells.shape[3] // 2
    centres = []
    for i, j in ((row, column), (row + 1, column + 1)):
        (gradient,) = torch.autograd.grad(cells[:, :, i, j].sum(), probe, retain_graph=True)
        ys, xs = (gradient.abs().sum((0, 1)) > 0).nonzero(as_tuple=True)
        centres.append([(ys.min() + ys.max()).item() / 2, (xs.min() + xs.max()).item() / 2])
    (y0, x0), (y1, x1) = centres
    stride_y, stride_x = y1 - y0, x1 - x0
    first = (y0 - stride_y * row, x0 - stride_x * column)
    map_height, map_width = map_size
    last = (first[0] + stride_y * (map_height - 1), first[1] + stride_x * (map_width - 1))
    return torch.tensor([first, last], dtype=torch.float32)


def _stretched(map_size: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """The centres of a map's first and last cells when the map is spread evenly over the whole image: (2, 2)."""
    cell = [side / cells for side, cells in zip(size, map_size, strict=True)]
    first = [(cell[0] - 1) / 2, (cell[1] - 1) / 2]
    return torch.tensor([first, [size[0] - 1 - first[0], size[1] - 1 - first[1]]])


def onto_input(cam: torch.Tensor, centres: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample a (1, 1, h, w) map so that each cell lands on its receptive field's centre: (H, W)."""
    (first_y, first_x), (last_y, last_x) = centres.tolist()

    def axis(count: int, first: float, last: float) -> torch.Tensor:
        positions = torch.arange(count, dtype=torch.float32)
        # grid_sample's -1 and +1 are the first and last cells (align_corners=True)
        return 2 * (positions - first) / (last - first) - 1 if last > first else torch.zeros(count)

    grid_y, grid_x = torch.meshgrid(axis(size[0], first_y, last_y), axis(size[1], first_x, last_x), indexing="ij")
    grid = torch.stack((grid_x, grid_y), dim=-1)[None].to(cam)  # (1, H, W, 2) as (x, y)
    return F.grid_sample(cam, grid, mode="bilinear", padding_mode="border", align_corners=True)[0, 0]


def write_explanation(explanation: Explanation, image: np.ndarray, out: Path, title: str) -> list[Path]:
    """gradcam.png, one feature_maps_<layer>.png per conv layer, filters.png and explanation.json."""
    out.mkdir(parents=True, exist_ok=True)
    probability = explanation.probabilities[explanation.target]
    paths = [
        figures.save(
            figures.heatmap_overlay(image, explanation.heat, f"{title}: {explanation.target} ({probability:.2f})"),
            out / "gradcam.png",
        )
    ]
    for name, maps in explanation.feature_maps.items():
        paths.append(
            figures.save(
                figures.channel_grid(maps, f"feature maps of {name} ({len(maps)} channels)"),
                out / f"feature_maps_{name.replace('.', '_')}.png",
            )
        )
    paths.append(
        figures.save(figures.channel_grid(explanation.first_filters, "first conv layer's filters"), out / "filters.png")
    )
    summary = {
        "target": explanation.target,
        "predicted": explanation.predicted,
        "probabilities": explanation.probabilities,
    }
    write_text(out / "explanation.json", json.dumps(summary, indent=2))
    return paths
