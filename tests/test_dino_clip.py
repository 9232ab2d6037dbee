"""DINO and CLIP: losses against the papers' formulas; centre, schedules, crops, captions."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from sslab.methods.clip import END, PAD, START, WordTokenizer, clip_loss
from sslab.methods.dino import dino_loss
from sslab.platform.build import build_method
from sslab.platform.data import load_dataset
from sslab.platform.validate import build_study

TINY_SGD = {
    "name": "t",
    "data": {"name": "synthetic", "train_size": 64, "test_size": 32, "image_size": 16},
    "train": {"optimizer": "sgd", "lr": 0.1, "batch_size": 32},
}


def test_dino_loss_matches_eq3():
    """DINO eq. (3): sum_{x in globals} sum_{x' != x} H(P_t(x), P_s(x')), with
    P_t = softmax((g_t - c)/tau_t) and H(a, b) = -a . log b; here averaged over the pairs."""
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(3, 5, generator=g) for _ in range(4)]  # 2 global + 2 local
    teacher = [torch.randn(3, 5, generator=g) for _ in range(2)]
    center, ts, tt = torch.randn(1, 5, generator=g), 0.1, 0.04
    total, pairs = 0.0, 0
    for i in range(2):
        for j in range(4):
            if i == j:
                continue
            for b in range(3):
                pt = [math.exp((teacher[i][b, k] - center[0, k]) / tt) for k in range(5)]
                ps = [math.exp(student[j][b, k] / ts) for k in range(5)]
                total += -sum(pt[k] / sum(pt) * math.log(ps[k] / sum(ps)) for k in range(5)) / 3
            pairs += 1
    assert dino_loss(student, teacher, center, ts, tt).item() == pytest.approx(total / pairs, rel=1e-4)


def test_dino_center_is_an_ema_of_teacher_outputs(make_method):
    dino, _ = make_method("dino", out_dim=8, center_momentum=0.9)
    dino.update_center(torch.ones(1, 8))
    assert torch.allclose(dino.center, torch.full((1, 8), 0.1))
    dino.update_center(torch.ones(1, 8))
    assert torch.allclose(dino.center, torch.full((1, 8), 0.19))


def test_dino_teacher_temperature_warms_up_linearly(make_method):
    dino, _ = make_method("dino", warmup_teacher_temp=0.04, teacher_temp=0.07, teacher_temp_warmup=0.3)
    # 30 warm-up steps of 100; like the learning rate, step k runs the value at (k + 1) / 30
    assert dino.teacher_temp(0) == pytest.approx(0.04 + 0.03 / 30)
    assert dino.teacher_temp(14) == pytest.approx(0.055)
    assert dino.teacher_temp(29) == dino.teacher_temp(30) == dino.teacher_temp(99) == pytest.approx(0.07)


def test_dino_multi_crop_views(make_method):
    dino, data = make_method("dino", local_crops=3, out_dim=16)
    images = data.train_images[:4]
    views = dino.views
    assert [views[name](images).shape[-1] for name in ("global_1", "global_2")] == [16, 16]
    assert views["local"](images).shape[-1] < 16
    loss, metrics = dino.training_step(images, 0)
    assert torch.isfinite(loss) and 0 <= metrics["teacher_entropy"] <= math.log(16) + 1e-4


def test_dino_last_layer_is_frozen_for_its_fraction_of_training(make_method):
    """DINO's code (freeze_last_layer): the prototypes get no update at first, then do; the rest
    of the student trains from the first step."""
    from sslab.platform.optim import build_optimizer
    from sslab.platform.train import train_step

    dino, data = make_method("dino", out_dim=16, local_crops=0, freeze_last_layer=0.5)  # 50 of 100 steps
    optimizer = build_optimizer(dino, build_study({**TINY_SGD, "method": "dino"}).train)
    last, first = dino.head.last.weight, dino.head.mlp[0].weight
    images = data.train_images[:8]
    before_last, before_first = last.detach().clone(), first.detach().clone()
    train_step(dino, dino, optimizer, images, 49, torch.arange(8), amp=False)
    assert torch.equal(dino.head.last.weight, before_last)
    assert not torch.equal(first, before_first)
    train_step(dino, dino, optimizer, images, 50, torch.arange(8), amp=False)
    assert not torch.equal(dino.head.last.weight, before_last)


def test_dino_head_layers_and_batch_norm(make_method):
    dino, _ = make_method("dino", out_dim=16, head_layers=2, head_batch_norm=True, norm_last_layer=False)
    kinds = [type(m).__name__ for m in dino.head.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear"]
    assert dino.head.last.parametrizations.weight.original0.requires_grad  # prototype norms learnt
    plain, _ = make_method("dino", out_dim=16, head_layers=3, head_batch_norm=False)
    assert [type(m).__name__ for m in plain.head.mlp].count("Linear") == 3
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in plain.head.mlp)
    # DINO's code: the MLP's linear layers start from a truncated normal of std 0.02.
    weight = plain.head.mlp[0].weight
    assert weight.std().item() == pytest.approx(0.02, rel=0.15)  # PyTorch default here: 0.05


def test_small_images_get_the_small_image_recipe_and_a_study_overrides_it(tiny_raw):
    """Images up to 64 px default to each method's small_image_args (DINO: 2-layer BN head, no
    local crops, faster teacher, no blur); larger images keep the paper's defaults."""
    from sslab.methods.dino import DINO, DINOArgs

    tiny_raw.update(method="dino", method_args={})
    small = build_study(tiny_raw).method_args
    assert small["local_crops"] == 0 and small["head_layers"] == 2 and small["momentum_teacher"] == 0.99
    tiny_raw["data"] = dict(tiny_raw["data"], image_size=96)
    large = build_study(tiny_raw).method_args
    assert large == dataclasses.asdict(DINOArgs())  # the paper's recipe
    tiny_raw["data"]["image_size"] = 16
    tiny_raw["method_args"] = {"local_crops": 2}
    assert build_study(tiny_raw).method_args["local_crops"] == 2  # the study's value wins
    assert DINO.views(DINOArgs(), 32)["global_1"].recipe.blur_p == 0.0
    assert DINO.views(DINOArgs(), 96)["global_1"].recipe.blur_p == 1.0


def test_dino_logs_the_teacher_student_kl_and_monitors_the_student(make_method):
    """KL(P_t || P_s) = H(P_t, P_s) - H(P_t) (DINO Fig. 7), and the kNN monitor scores the student
    beside the teacher that evaluation measures."""
    dino, data = make_method("dino", out_dim=16)
    loss, metrics = dino.training_step(data.train_images[:8], 0)
    assert metrics["teacher_student_kl"].item() == pytest.approx(
        loss.item() - metrics["teacher_entropy"].item(), abs=1e-5
    )
    assert metrics["teacher_student_kl"].item() >= -1e-5  # a KL is never negative
    assert set(dino.monitored_encoders()) == {"student"}
    assert dino.monitored_encoders()["student"].module is dino.backbone


def test_dino_runs_on_a_vit(make_method, tiny_raw):
    tiny_raw["backbone"] = {"name": "vit_tiny", "patch_size": 4, "width": 0.25}
    dino, data = make_method("dino", local_crops=2, out_dim=16)
    loss, _ = dino.training_step(data.train_images[:4], 0)
    loss.backward()
    assert torch.isfinite(loss)


def test_clip_loss_matches_the_papers_pseudocode():
    """CLIP Fig. 3: logits = I_e . T_e^T * exp(t); loss = (CE(logits, arange) + CE(logits^T, arange)) / 2."""
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    scale = torch.tensor(math.log(1 / 0.07))
    i_e, t_e = F.normalize(image, dim=1), F.normalize(text, dim=1)
    logits = i_e @ t_e.T * scale.exp()
    rows = [-math.log(math.exp(logits[i, i]) / sum(math.exp(v) for v in logits[i])) for i in range(5)]
    cols = [-math.log(math.exp(logits[i, i]) / sum(math.exp(v) for v in logits[:, i])) for i in range(5)]
    expected = (sum(rows) / 5 + sum(cols) / 5) / 2
    assert clip_loss(image, text, scale).item() == pytest.approx(expected, rel=1e-5)


def test_tokenizer_frames_words_and_pads():
    tok = WordTokenizer(["a red disk on blue", "a blue ring on red"], max_tokens=8)
    ids = tok(["a red ring", "a green disk"])
    assert ids[0, 0] == START and ids[0, 4] == END and (ids[0, 5:] == PAD).all()
    assert ids[1, 3] == END  # 'green' is not in the vocabulary: dropped


def test_clip_pairs_images_with_their_captions_and_scores_zero_shot(make_method):
    clip, data = make_method("clip")
    assert clip.train_tokens.shape == (len(data.train_images), 16)
    assert clip.augment.recipe.jitter_p == 0  # captions name colours
    loss, metrics = clip.training_step(data.train_images[:8], 0, torch.arange(8))
    assert loss.item() == pytest.approx(math.log(8), rel=0.3)  # chance level at init
    clip.eval()
    assert 0 <= clip.evaluate(data)["zero_shot_top1"] <= 1


def test_clip_captions_from_a_template_for_labelled_folders(tiny_raw):
    """A labelled folder has no captions: each image gets the template filled with its class."""
    tiny_raw.update(method="clip", method_args={"caption_template": "a picture of a {}"})
    study = build_study(tiny_raw)
    data = load_dataset(study.data)
    data.train_captions, data.class_prompts = None, None
    clip = build_method(study, data, torch.device("cpu"), total_steps=10)
    assert clip.prompts[0] == ["a picture of a disk"]
    first = data.classes[data.train_labels[0]]
    assert clip.train_tokens[0].tolist() == clip.tokenizer([f"a picture of a {first}"])[0].tolist()


def test_views_are_declared_and_every_study_override_reaches_them(tiny_raw):
    """The study's `augment:` applies to every view a method declares (BYOL's second view too,
    DINO's local crops too); `augment.views.<name>` to one of them."""
    from sslab.platform.build import build_method

    tiny_raw.update(method="byol", augment={"blur_p": 0.0, "solarize_p": 0.0})
    study = build_study(tiny_raw)
    byol = build_method(study, load_dataset(study.data), torch.device("cpu"), total_steps=10)
    assert [byol.views[v].recipe.blur_p for v in ("first", "second")] == [0.0, 0.0]
    assert byol.views["second"].recipe.solarize_p == 0.0

    tiny_raw.update(
        method="dino",
        method_args={"out_dim": 16, "local_crop_size": 8, "local_crops": 2},
        augment={"jitter_p": 0.5, "views": {"local": {"crop_scale_min": 0.1}}},
    )
    study = build_study(tiny_raw)
    dino = build_method(study, load_dataset(study.data), torch.device("cpu"), total_steps=10)
    assert {name: view.recipe.jitter_p for name, view in dino.views.items()} == {
        "global_1": 0.5,
        "global_2": 0.5,
        "local": 0.5,
    }
    assert dino.views["local"].recipe.crop_scale_min == 0.1
    assert dino.views["global_1"].recipe.crop_scale_min == 0.4  # the paper's global crop
    assert dino.views["local"](load_dataset(study.data).train_images[:2]).shape[-1] == 8


@pytest.mark.parametrize(
    "augment, key",
    [
        ({"views": {"locals": {"blur_p": 0.1}}}, "augment.views.locals"),
        ({"views": {"local": {"blur_p": 2}}}, "augment.views.local.blur_p"),
        ({"crop_scale_min": 0.5}, "augment"),
    ],
)  # > the local crops' max
def test_view_overrides_are_validated(tiny_raw, augment, key):
    from sslab.platform.config import ConfigError

    # local crops drawn (at 16 px the small-image default draws none, and a view never drawn
    # is not range-checked)
    tiny_raw.update(method="dino", augment=augment, method_args={"local_crops": 2})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_study(tiny_raw)


def test_a_view_drawn_zero_times_is_not_built(tiny_raw):
    """SwAV at 16 px draws no local crops; a study-wide crop_scale_min above their 0.14 maximum
    (methods_compare's 0.2) is then no error, and the method builds and trains (it crashed)."""
    from sslab.platform.build import build_method

    tiny_raw.update(method="swav", augment={"crop_scale_min": 0.2}, method_args={"num_prototypes": 16})
    study = build_study(tiny_raw)
    data = load_dataset(study.data)
    swav = build_method(study, data, torch.device("cpu"), total_steps=10)
    assert set(swav.views) == {"global"} and swav.views["global"].recipe.crop_scale_min == 0.2
    loss, _ = swav.training_step(data.train_images[:8], step=0)
    assert torch.isfinite(loss)


def test_each_method_reads_collapse_from_its_own_diagnostics(make_method):
    """DINO Sec. 5.3 / Fig. 7: both collapses drive KL(teacher || student) to 0; the teacher's
    entropy then tells them apart (log K: uniform, 0: one prototype). Others read z_std."""
    dino, _ = make_method("dino", out_dim=1024)
    log_k = math.log(1024)
    assert dino.collapse_state({"teacher_entropy": 0.999 * log_k, "teacher_student_kl": 0.001}) == (
        "collapsed (uniform)"
    )
    assert (
        dino.collapse_state({"teacher_entropy": 0.01, "teacher_student_kl": 0.002}) == "collapsed (one-hot)"
    )
    assert dino.collapse_state({"teacher_entropy": 0.999 * log_k, "teacher_student_kl": 0.3}) == "learning"
    assert dino.collapse_state({"teacher_entropy": 0.6 * log_k, "teacher_student_kl": 0.001}) == "learning"
    simclr, _ = make_method("simclr")
    assert simclr.collapse_state({"z_std": 1e-5}) == "collapsed (constant)"
    assert simclr.collapse_state({"z_std": 0.05}) == "learning"
    assert simclr.collapse_state({"loss": 1.0}) == ""
