"""An explicit name -> Method class table: adding a method is one import and one line here."""

from __future__ import annotations

from sslab.methods.barlow_twins import BarlowTwins
from sslab.methods.base import Method
from sslab.methods.byol import BYOL
from sslab.methods.clip import CLIP
from sslab.methods.colorization import Colorization
from sslab.methods.context_encoder import ContextEncoder
from sslab.methods.cpc import CPC
from sslab.methods.dino import DINO
from sslab.methods.jigsaw import Jigsaw
from sslab.methods.mae import MAE
from sslab.methods.moco import MoCoV1, MoCoV2
from sslab.methods.moco_v3 import MoCoV3
from sslab.methods.relative_patch import RelativePatch
from sslab.methods.rotation import Rotation
from sslab.methods.simclr import SimCLR
from sslab.methods.simsiam import SimSiam
from sslab.methods.split_brain import SplitBrain
from sslab.methods.swav import SwAV
from sslab.methods.vicreg import VICReg
from sslab.methods.video_colorization import VideoColorization

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        SimCLR,
        MoCoV1,
        MoCoV2,
        MoCoV3,
        BYOL,
        SimSiam,
        BarlowTwins,
        VICReg,
        SwAV,
        CPC,
        DINO,
        CLIP,  # contrastive, non-contrastive, clustering, self-distillation
        Rotation,
        Jigsaw,
        RelativePatch,
        ContextEncoder,
        Colorization,
        SplitBrain,  # pretext tasks
        MAE,  # masked image modelling
        VideoColorization,  # video: colourisation as tracking
    )
}


def get_method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]
