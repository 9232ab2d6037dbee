"""The trained encoder out of sslab, in the formats people load.

An export folder holds:
- `encoder.pt`: the encoder's weights as a plain state_dict, in the key layout of the architecture
  it is: torchvision's ResNet names for sslab's ResNets, timm's VisionTransformer names for its
  ViTs, sslab's own otherwise (a SimCLR `z` head, colorization's L-channel network);
- `encoder.json`: the architecture, backbone config, feature dimension, image size and the
  normalisation mean/std it was trained with (of RGB in [0, 1]);
- `load.py` (a copy of `export_loader.py`): `load(folder)`, with torch and torchvision/timm only,
  for any width multiplier (torchvision has constructors for width 1 alone).
The trial writes this at its end and logs it to its MLflow run (`export/`), so `sslab export`
works from any machine that reads the tracking server.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torchvision
from torch import nn

from sslab.methods.base import Method
from sslab.platform.augment import Normalize
from sslab.platform.backbones import BACKBONES, build_backbone, resnet_widths
from sslab.platform.build import build_method
from sslab.platform.config import StudyConfig
from sslab.platform.data import load_dataset
from sslab.platform.validate import build_study

# The run's artifact folder of the export. Not `encoder`, the logged MLflow model's name: MLflow
# reads `runs:/<id>/<name>` as that model's files too, and merged the two on download.
EXPORT_ARTIFACT = "export"


def torchvision_resnet_state(net: nn.Sequential, depths: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """sslab's ResNet (stem, blocks, pool as one Sequential) -> torchvision's ResNet key names:
    conv1, bn1, layer<s>.<i>. The blocks are torchvision's own, so their inner names match."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    blocks = [i for i, m in enumerate(net) if isinstance(m, (BasicBlock, Bottleneck))]
    places = [f"layer{s + 1}.{i}" for s, depth in enumerate(depths) for i in range(depth)]
    names = {0: "conv1", 1: "bn1", **dict(zip(blocks, places))}
    state = {}
    for key, value in net.state_dict().items():
        index, rest = key.split(".", 1)
        state[f"{names[int(index)]}.{rest}"] = value.detach().clone()
    return state


def _is_plain_backbone(module: nn.Module, study: StudyConfig) -> bool:
    """True when `module` is the study's backbone as built (a teacher copy counts): same keys,
    same shapes. A head on top (SimCLR's z) or another network is not."""
    fresh, _ = build_backbone(study.backbone, study.data.image_size)
    mine, theirs = module.state_dict(), fresh.state_dict()
    return mine.keys() == theirs.keys() and all(mine[k].shape == theirs[k].shape for k in mine)


def load_lines(info: dict, folder: str) -> list[str]:
    """The three lines a user pastes to get the encoder back."""
    b, architecture = info["backbone"], info["architecture"]
    # torchvision's constructor (resnet18, ...) at width 1; any other ResNet through load.py
    if architecture.startswith("torchvision") and b["width"] == 1 and "resnet.ResNet" not in architecture:
        stem = (
            "; model.conv1, model.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()"
            if b["cifar_stem"]
            else ""
        )
        return [
            "import torch, torchvision",
            f"model = torchvision.models.{b['name']}(); model.fc = torch.nn.Identity(){stem}",
            f'model.load_state_dict(torch.load("{folder}/encoder.pt", weights_only=True)); model.eval()',
        ]
    if info["architecture"].startswith("timm"):
        return [
            "import torch; from timm.models.vision_transformer import VisionTransformer",
            f"model = VisionTransformer(**{info['timm_kwargs']!r})",
            f'model.load_state_dict(torch.load("{folder}/encoder.pt", weights_only=True)); model.eval()',
        ]
    return [
        "import runpy",
        f'model = runpy.run_path("{folder}/load.py")["load"]("{folder}")',
        "model.eval()",
    ]


def export_info(method: Method, study: StudyConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict in its architecture's layout, description) of `method.encoder()`."""
    encoder = method.encoder()
    module, b = encoder.module, study.backbone
    info = {
        "method": study.method,
        "backbone": {
            "name": b.name,
            "width": b.width,
            "cifar_stem": b.cifar_stem,
            "patch_size": b.patch_size,
        },
        "image_size": study.data.image_size,
        "feature_dim": encoder.dim,
        "input": "RGB in [0, 1], then (x - mean) / std per channel",
    }
    if isinstance(encoder.transform, Normalize):
        info["mean"] = encoder.transform.mean.flatten().tolist()
        info["std"] = encoder.transform.std.flatten().tolist()
    else:
        info["input"] = f"{study.method}'s own input transform (not plain RGB normalisation): load with sslab"
    plain = isinstance(encoder.transform, Normalize) and _is_plain_backbone(module, study)
    entry = BACKBONES[b.name]
    if plain and entry.family == "resnet":
        # torchvision's own constructor where it has one of this depth (resnet18, resnet50, ...)
        constructor = b.name if hasattr(torchvision.models, b.name) else "resnet.ResNet"
        info |= {
            "architecture": f"torchvision.models.{constructor}",
            "widths": resnet_widths(b),
            "block": entry.resnet_block,
            "depths": list(entry.resnet_depths),
        }
        return torchvision_resnet_state(module, entry.resnet_depths), info
    if plain and entry.family == "vit":
        info |= {
            "architecture": "timm.models.vision_transformer.VisionTransformer",
            "timm_kwargs": {
                "img_size": study.data.image_size,
                "patch_size": b.patch_size,
                "embed_dim": module.embed_dim,
                "depth": len(module.blocks),
                "num_heads": module.blocks[0].attn.num_heads,
                "num_classes": 0,
                "global_pool": "token",
                "dynamic_img_size": True,
            },
        }
        return {k: v.detach().clone() for k, v in module.state_dict().items()}, info
    info["architecture"] = "sslab"
    info["study"] = study.to_dict()
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, info


def write_export(method: Method, study: StudyConfig, out: Path, run_id: str | None = None) -> dict:
    """Writes encoder.pt, encoder.json and load.py into `out`; returns the description."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state, info = export_info(method, study)
    info["run_id"] = run_id
    torch.save({k: v.cpu() for k, v in state.items()}, out / "encoder.pt")
    (out / "encoder.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.copyfile(Path(__file__).with_name("export_loader.py"), out / "load.py")
    return info


def load_sslab_export(folder) -> nn.Module:
    """An "architecture: sslab" export back as a module (input transform included). The method is
    rebuilt from the study, which reads the study's data (for its input statistics)."""
    info = json.loads((Path(folder) / "encoder.json").read_text())
    study = build_study(info["study"])
    method = build_method(study, load_dataset(study.data), torch.device("cpu"), total_steps=1)
    encoder = method.encoder()
    encoder.module.load_state_dict(torch.load(Path(folder) / "encoder.pt", weights_only=True))
    return EncoderModule(encoder).eval()


class EncoderModule(nn.Module):
    """images (uint8, or RGB in [0, 1]) -> features: the encoder with its input transform, the
    module logged as the run's MLflow model."""

    def __init__(self, encoder):
        super().__init__()
        self.module, self._transform = encoder.module, encoder.transform
        if isinstance(encoder.transform, nn.Module):
            self.transform = encoder.transform

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(self._transform(images))
