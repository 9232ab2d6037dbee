"""Loads an `sslab export` folder with torch and torchvision / timm alone.

`sslab export` copies this file into the folder as `load.py`; it imports nothing of sslab except
for networks that are sslab's own (architecture "sslab"):

    import runpy
    model = runpy.run_path("EXPORT/load.py")["load"]("EXPORT")
"""

import json
from pathlib import Path

import torch
from torch import nn


def load(folder=Path(__file__).parent) -> nn.Module:
    """The exported encoder, weights loaded strictly, in eval mode. Its input is RGB in [0, 1]
    normalised with encoder.json's mean and std (for architecture "sslab": uint8 or [0, 1] RGB)."""
    folder = Path(folder)
    info = json.loads((folder / "encoder.json").read_text())
    arch = info["architecture"]
    if arch.startswith("torchvision"):
        model = _torchvision_resnet(info)
    elif arch.startswith("timm"):
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(**info["timm_kwargs"])
    else:
        from sslab.platform.export import load_sslab_export

        return load_sslab_export(folder)
    model.load_state_dict(torch.load(folder / "encoder.pt", weights_only=True))
    return model.eval()


def _torchvision_resnet(info: dict) -> nn.Module:
    """torchvision's ResNet rebuilt at the exported widths (any width multiplier) with its own
    blocks and `_make_layer`, the classifier dropped: the features are the pooled 512-d (x width)."""
    from torchvision.models import resnet

    backbone, widths, depths = info["backbone"], info["widths"], info["depths"]
    block = getattr(resnet, info["block"])  # BasicBlock or Bottleneck
    model = resnet.ResNet(block, depths)
    if backbone["cifar_stem"]:  # 3x3 stride-1 stem, no max-pool (SimCLR App. B.9)
        model.conv1, model.maxpool = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.Identity()
    else:
        model.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
    model.bn1, model.inplanes, model.fc = nn.BatchNorm2d(widths[0]), widths[0], nn.Identity()
    for stage, (width, depth) in enumerate(zip(widths, depths)):
        layer = model._make_layer(block, width, depth, stride=1 if stage == 0 else 2)
        setattr(model, f"layer{stage + 1}", layer)
    return model
