"""CLIP-style image-text contrastive learning: Radford et al. 2021, Learning Transferable Visual
Models From Natural Language Supervision."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslab.methods.base import Method, MethodContext
from sslab.methods.losses import embedding_std, in_fp32
from sslab.platform.augment import CROP_FLIP, AugmentRecipe
from sslab.platform.config import check
from sslab.platform.distributed import gather_with_grad, global_index

PAD, START, END = 0, 1, 2


@dataclass
class CLIPArgs:
    embed_dim: int = check(default=128, gt=0)
    text_width: int = check(default=128, gt=0)
    text_layers: int = check(default=2, ge=1)
    text_heads: int = check(default=4, ge=1)
    max_tokens: int = check(default=16, ge=3)
    init_temperature: float = check(default=0.07, gt=0)  # learnable; logit scale capped at 100
    caption_template: str = "a photo of a {}"  # for labelled data without captions


class WordTokenizer:
    """Lower-case words -> ids, vocabulary from the captions it is built on (deterministic)."""

    def __init__(self, texts: list[str], max_tokens: int):
        words = sorted({w for t in texts for w in self.words(t)})
        self.ids = {w: i + 3 for i, w in enumerate(words)}
        self.max_tokens = max_tokens

    @staticmethod
    def words(text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", text.lower())

    def __len__(self) -> int:
        return len(self.ids) + 3

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), max_tokens] ids: START words END, then PAD (unknown words dropped)."""
        out = torch.full((len(texts), self.max_tokens), PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = (
                [START]
                + [self.ids[w] for w in self.words(text) if w in self.ids][: self.max_tokens - 2]
                + [END]
            )
            out[row, : len(ids)] = torch.tensor(ids)
        return out


class TextEncoder(nn.Module):
    """A small causal transformer; the END token's features are the text's embedding (as CLIP)."""

    def __init__(self, vocab: int, args: CLIPArgs):
        super().__init__()
        self.embed = nn.Embedding(vocab, args.text_width)
        self.position = nn.Parameter(0.01 * torch.randn(args.max_tokens, args.text_width))
        layer = nn.TransformerEncoderLayer(
            args.text_width,
            args.text_heads,
            4 * args.text_width,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
            activation="gelu",
        )
        self.blocks = nn.TransformerEncoder(layer, args.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(args.text_width)
        self.project = nn.Linear(args.text_width, args.embed_dim, bias=False)
        mask = torch.triu(torch.full((args.max_tokens, args.max_tokens), float("-inf")), diagonal=1)
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        x = self.norm(self.blocks(x, mask=self.causal_mask))
        end = (tokens == END).float().argmax(dim=1)
        return self.project(x[torch.arange(len(x)), end])


@in_fp32
def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE (Fig. 3 pseudocode): cross-entropy over the scaled cosine
    similarities of image i with every text, and of text i with every image, averaged.
    Under DDP this rank's rows meet the global batch's columns."""
    image, text = F.normalize(image, dim=1), F.normalize(text, dim=1)
    all_image, all_text = gather_with_grad(image), gather_with_grad(text)
    labels = global_index(len(image), image.device)
    scale = logit_scale.exp()
    return (
        F.cross_entropy(scale * image @ all_text.T, labels)
        + F.cross_entropy(scale * text @ all_image.T, labels)
    ) / 2


class CLIP(Method):
    """Image encoder + text encoder, contrasted over the batch's image-caption pairs."""

    name = "clip"
    Args = CLIPArgs
    pairs_images_with_labels = True  # captions per training image, or built from its label
    # The paper (Sec. 2.5, App. F): AdamW, betas (0.9, 0.98), decoupled weight decay 0.2 on every
    # weight but gains, biases and the temperature (the platform's groups), lr 5e-4 for the
    # ResNet-50 at batch 32,768, unscaled here; its ViTs' eps 1e-6 and 2,000 warm-up iterations are
    # not taken (torch's eps; no warm-up). The same at every image size.
    train_recipe = {"optimizer": "adamw", "lr": 5e-4, "weight_decay": 0.2, "adamw_beta2": 0.98}

    def __init__(self, args: CLIPArgs, ctx: MethodContext):
        super().__init__(args, ctx)
        data = ctx.dataset
        self.captions_from_labels = not data.train_captions
        captions = data.train_captions or [
            args.caption_template.format(data.classes[y]) for y in data.train_labels.tolist()
        ]
        self.prompts = data.class_prompts or [[args.caption_template.format(c)] for c in data.classes]
        self.tokenizer = WordTokenizer(captions + [p for ps in self.prompts for p in ps], args.max_tokens)
        self.register_buffer("train_tokens", self.tokenizer(captions), persistent=False)
        self.image_projection = nn.Linear(ctx.feature_dim, args.embed_dim, bias=False)
        self.text_encoder = TextEncoder(len(self.tokenizer), args)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / args.init_temperature)))

    @classmethod
    def augment_recipe(cls, args) -> AugmentRecipe:
        # Captions name colours: no colour jitter or grayscale, which would make them false.
        return CROP_FLIP

    def training_step(self, images, step, index=None):
        image = self.image_projection(self.backbone(self.augment(images)))
        text = self.text_encoder(self.train_tokens[index.to(self.train_tokens.device)])
        loss = clip_loss(image, text, self.logit_scale)
        return loss, {"temperature": 1 / self.logit_scale.detach().exp(), "z_std": embedding_std(image)}

    @torch.no_grad()
    def on_step_end(self, step):
        self.logit_scale.clamp_(max=math.log(100))  # CLIP caps the scale at 100

    @torch.no_grad()
    def uses_labels(self) -> str:
        if self.captions_from_labels:
            return "clip's captions are built from the class labels (caption_template)"
        return "clip's captions describe each image, naming its class on the synthetic data"

    def evaluate(self, data) -> dict[str, float]:
        """Zero-shot top-1 on the test split: each image takes the class whose prompts'
        mean text embedding is closest (prompt ensembling, CLIP Sec. 3.1.4)."""
        device = self.logit_scale.device
        class_embeddings = []
        for prompts in self.prompts:
            emb = F.normalize(self.text_encoder(self.tokenizer(prompts).to(device)).float(), dim=1)
            class_embeddings.append(F.normalize(emb.mean(dim=0), dim=0))
        classes = torch.stack(class_embeddings)
        correct = 0
        for start in range(0, len(data.test_images), 512):
            images = data.test_images[start : start + 512].to(device)
            image = F.normalize(self.image_projection(self.backbone(self.normalize(images))).float(), dim=1)
            predicted = (image @ classes.T).argmax(dim=1).cpu()
            correct += (predicted == data.test_labels[start : start + 512]).sum().item()
        return {"zero_shot_top1": correct / len(data.test_images)}
