"""Video colourisation as tracking (Vondrick et al. 2018): the embedded clips, the copied-colour
loss against eq. 1-2 written out, mask propagation and J, video folders, and validation."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, for_method
from sslab.methods.video_colorization import ab_kmeans, copied_colour_loss
from sslab.platform.config import ConfigError, DataConfig, EvalConfig
from sslab.platform.data import load_dataset
from sslab.platform.dataset import DataError
from sslab.platform.propagation import propagate, propagation_scores, region_similarity
from sslab.platform.synthetic_video import synthetic_video
from sslab.platform.validate import build_study


def video_raw(**data) -> dict:
    raw = for_method(copy.deepcopy(TINY), "video_colorization")
    raw["data"].update(data)
    return raw


def test_synthetic_clips_move_and_their_masks_name_the_coloured_objects():
    cfg = DataConfig(name="synthetic_video", train_size=4, test_size=6, image_size=64, clip_length=8)
    data = synthetic_video(cfg)
    assert data.train_images.shape == (4, 8, 3, 64, 64) and data.train_images.dtype == torch.uint8
    assert data.test_masks.shape == (6, 8, 64, 64)
    assert torch.equal(synthetic_video(cfg).test_images, data.test_images)  # deterministic
    for clip, masks in zip(data.test_images, data.test_masks):
        ids = torch.unique(masks[0]).tolist()
        assert ids[0] == 0 and 2 <= len(ids) - 1 <= 3  # background and 2-3 objects in view
        # objects move: the first frame's mask no longer fits the last one
        assert (masks[0] != masks[-1]).float().mean() > 0.01
        for obj in ids[1:]:  # an object's pixels share one hue, unlike the background's
            pixels = clip[0].permute(1, 2, 0)[masks[0] == obj].float()
            hue = pixels / pixels.sum(1, keepdim=True).clamp(min=1)
            assert hue.std(0).max() < 0.06


def test_copied_colour_loss_is_eq_1_and_2_written_out():
    # Vondrick et al. 2018, eq. 1: A_ij = exp(f_i . f_j) / sum_k exp(f_k . f_j), y_j = sum_i A_ij c_i;
    # eq. 2: the cross-entropy of y_j against the target's true colour.
    torch.manual_seed(0)
    b, n, m, d, k, temperature = 2, 5, 7, 4, 3, 0.5
    target, refs = torch.randn(b, n, d), torch.randn(b, m, d)
    ref_colours = torch.stack([torch.randperm(m) % k for _ in range(b)])  # every colour in the references
    target_colours = torch.randint(k, (b, n))
    loss, copied = copied_colour_loss(target, refs, ref_colours, target_colours, k, temperature)
    total = 0.0
    for c in range(b):
        for j in range(n):
            weights = [torch.exp(refs[c, i] @ target[c, j] / temperature) for i in range(m)]
            y = sum(w * torch.nn.functional.one_hot(ref_colours[c, i], k) for i, w in enumerate(weights))
            y = y / sum(weights)
            assert torch.allclose(copied[c, j], y, atol=1e-6)
            total += -torch.log(y[target_colours[c, j]])
    assert loss.item() == pytest.approx(total.item() / (b * n), rel=1e-5)


def test_kmeans_finds_the_colours_of_the_clips():
    red, blue = torch.tensor([220, 20, 20]), torch.tensor([20, 20, 220])
    clips = torch.zeros(2, 2, 3, 8, 8, dtype=torch.uint8)
    clips[:, :, :, :, :4] = red[:, None, None]
    clips[:, :, :, :, 4:] = blue[:, None, None]
    centres = ab_kmeans(clips, 2, pixels=200)
    from sslab.methods.colorization import rgb_to_lab

    truth = rgb_to_lab(torch.stack([red, blue]).float().div(255).view(2, 3, 1, 1))[:, 1:, 0, 0]
    distances = torch.cdist(truth, centres)
    assert distances.min(1).values.max() < 0.5  # each colour has a centre on it


def position_features(frames_masks: torch.Tensor) -> torch.Tensor:
    """Features [T, L, h, w] that say which object a location shows (one-hot of the true id)."""
    return torch.nn.functional.one_hot(frames_masks.long(), 4).permute(0, 3, 1, 2).float()


def test_propagation_with_identity_features_tracks_what_copying_loses():
    clip = synthetic_video(DataConfig(name="synthetic_video", train_size=1, test_size=1, image_size=32))
    truth = clip.test_masks[0]
    predicted = propagate(position_features(truth), truth[0], temperature=0.1, topk=5, context=1)
    assert torch.equal(predicted[0], truth[0])
    assert region_similarity(predicted, truth) > 0.99  # features that know the object track it
    copied = truth[:1].expand_as(truth)
    assert region_similarity(copied, truth) < 0.9  # the objects move away from their first mask


def test_region_similarity_is_iou_per_object_then_mean():
    truth = torch.zeros(3, 4, 4, dtype=torch.uint8)
    truth[:, :2, :2] = 1  # object 1: 4 px, still
    truth[:, 2:, 2:] = 2  # object 2: 4 px, still
    predicted = truth.clone()
    predicted[1:, 0, 0] = 0  # object 1: 3 of 4 px in frames 1 and 2: IoU 0.75
    predicted[2, 2:, 2:] = 0  # object 2 lost in frame 2: IoU 1 then 0
    assert region_similarity(predicted, truth) == pytest.approx((0.75 + 0.5) / 2)


def test_random_network_scores_and_copy_baseline_come_from_the_same_clips():
    data = load_dataset(build_study(video_raw()).data)
    eval_cfg = EvalConfig()
    scores = propagation_scores(
        lambda frames: position_features(torch.zeros(len(frames), 8, 8)),  # no information at all
        data.test_images,
        data.test_masks,
        torch.device("cpu"),
        eval_cfg,
    )
    copied = [region_similarity(m[:1].expand_as(m), m) for m in data.test_masks]
    assert scores["copy_first_j"] == pytest.approx(sum(copied) / len(copied))
    assert 0 <= scores["propagation_j"] <= 1


@pytest.mark.parametrize(
    "change, key",
    [
        ({"method": "simclr"}, "data.name"),  # an image method on clips
        ({"data": {"clip_length": 3}}, "data.clip_length"),  # 3 references + target need 4
    ],
)
def test_video_mismatches_are_config_errors(change, key):
    raw = video_raw()
    if "method" in change:
        raw["method"] = change["method"]
    else:
        raw["data"].update(change["data"])
    with pytest.raises(ConfigError) as err:
        build_study(raw)
    assert err.value.key == key


def test_video_method_on_images_is_a_config_error():
    raw = copy.deepcopy(TINY)
    raw["method"] = "video_colorization"
    with pytest.raises(ConfigError) as err:
        build_study(raw)
    assert err.value.key == "data.name" and "clips" in str(err.value)


def write_clip(folder, frames: int, with_masks: bool, size: int = 12):
    folder.mkdir(parents=True)
    for t in range(frames):
        picture = np.zeros((size, size, 3), dtype=np.uint8)
        picture[:, t : t + 4] = (200, 30, 30)  # a red bar moving right
        Image.fromarray(picture).save(folder / f"{t:05d}.jpg")
        if with_masks:
            (folder / "masks").mkdir(exist_ok=True)
            mask = Image.fromarray((picture[..., 0] > 100).astype(np.uint8), mode="P")
            mask.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # DAVIS-style palette PNG
            mask.save(folder / "masks" / f"{t:05d}.png")


def test_video_folder_loads_clips_and_palette_masks(tmp_path):
    write_clip(tmp_path / "train" / "a", 9, with_masks=False)  # one window of 4 (and 5 left over)
    write_clip(tmp_path / "train" / "b", 4, with_masks=False)
    write_clip(tmp_path / "test" / "c", 4, with_masks=True)
    raw = video_raw(name="videofolder", root=str(tmp_path), image_size=12)
    raw["train"]["batch_size"] = 2
    data = load_dataset(build_study(raw).data)
    assert data.kind == "video" and data.train_images.shape == (3, 4, 3, 12, 12)  # 2 + 1 windows
    assert data.test_masks.shape == (1, 4, 12, 12)
    assert data.test_masks[0, 2, 0].tolist() == [0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]  # the bar at t = 2


@pytest.mark.parametrize("problem", ["short clip", "missing mask"])
def test_bad_video_folders_name_the_clip(tmp_path, problem):
    write_clip(tmp_path / "train" / "a", 4, with_masks=False)
    write_clip(tmp_path / "test" / "c", 2 if problem == "short clip" else 4, with_masks=True)
    if problem == "missing mask":
        (tmp_path / "test" / "c" / "masks" / "00003.png").unlink()
    raw = video_raw(name="videofolder", root=str(tmp_path), image_size=12)
    raw["train"]["batch_size"] = 2
    with pytest.raises(ConfigError) as err:
        build_study(raw)
    assert err.value.key == "data.root" and str(tmp_path / "test" / "c") in str(err.value)
    with pytest.raises(DataError):  # the loader says the same without validation
        from sslab.platform.data import scan_video_folder

        scan_video_folder.cache_clear()
        scan_video_folder(tmp_path, 4)
