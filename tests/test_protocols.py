"""Evaluation protocols: linear probe against scikit-learn, label subsets, fine-tuning,
end-of-run evaluation and `sslab eval` on a run's checkpoint."""

import pytest
import torch

from sslab.platform.checkpoint import CHECKPOINT_NAME
from sslab.platform.cli import main
from sslab.platform.evaluate import balanced_subset, finetune, fraction_suffix, linear_probe
from sslab.platform.spec import trial_spec
from sslab.platform.tracking import Tracker, TrialTracking
from sslab.platform.train import train_loop
from sslab.platform.validate import build_study


def _blobs(seed=0, n_train=600, n_test=300, dim=32, classes=6, noise=2.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    ytr = torch.randint(0, classes, (n_train,), generator=g)
    yte = torch.randint(0, classes, (n_test,), generator=g)
    xtr = centres[ytr] + noise * torch.randn(n_train, dim, generator=g)
    xte = centres[yte] + noise * torch.randn(n_test, dim, generator=g)
    return xtr, ytr, xte, yte


def test_linear_probe_agrees_with_scikit_learn_logistic_regression():
    """Same objective (multinomial, L2, standardised features): accuracies within 1 point."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    xtr, ytr, xte, yte = _blobs()
    l2 = 1e-3
    ours = linear_probe(xtr, ytr, xte, yte, 6, l2=l2)["top1"]
    scaler = StandardScaler().fit(xtr.numpy())
    sk = LogisticRegression(C=1 / (l2 * len(xtr)), max_iter=5000, tol=1e-8)
    sk.fit(scaler.transform(xtr.numpy()), ytr.numpy())
    reference = (sk.predict(scaler.transform(xte.numpy())) == yte.numpy()).mean()
    assert 0.3 < reference < 0.95  # neither trivial nor hopeless
    assert abs(ours - reference) <= 0.01


def test_balanced_subset_is_class_balanced_and_deterministic():
    labels = torch.arange(10).repeat_interleave(100)
    keep = balanced_subset(labels, 0.1, seed=3)
    assert torch.bincount(labels[keep]).tolist() == [10] * 10
    assert torch.equal(keep, balanced_subset(labels, 0.1, seed=3))
    assert not torch.equal(keep, balanced_subset(labels, 0.1, seed=4))
    assert torch.bincount(labels[balanced_subset(labels, 0.001)]).tolist() == [1] * 10  # at least one
    assert (
        fraction_suffix(0.01) == "_1pct" and fraction_suffix(0.1) == "_10pct" and fraction_suffix(1.0) == ""
    )


def test_finetune_trains_a_copy_and_learns_an_easy_task():
    from sslab.methods.base import Encoder
    from sslab.platform.augment import Normalize
    from sslab.platform.backbones import build_backbone
    from sslab.platform.config import BackboneConfig
    from sslab.platform.synthetic import make_synthetic

    images, labels, _ = make_synthetic(3000, 16, seed=0)
    keep = (labels == 0) | (labels == 5)  # disks vs horizontal bars
    images, easy = images[keep], (labels[keep] == 5).long()
    encoder, dim = build_backbone(BackboneConfig(width=0.125), 16)
    before = [p.clone() for p in encoder.parameters()]
    result = finetune(
        Encoder(encoder, dim, Normalize([0.5] * 3, [0.25] * 3)),
        images[:500],
        easy[:500],
        images[500:],
        easy[500:],
        2,
        torch.device("cpu"),
        epochs=4,
        batch_size=50,
    )
    assert all(torch.equal(a, b) for a, b in zip(before, encoder.parameters()))
    assert result["top1"] > 0.6


def test_end_of_run_evaluation_logs_every_protocol_and_its_random_init(tmp_path, tiny_raw, tracking_uri):
    tiny_raw["eval"].update(
        protocols=["knn", "linear", "finetune"], label_fractions=[0.25, 1.0], finetune_epochs=1
    )
    tracker = Tracker(tracking_uri)
    experiment = tracker.experiment("protocols", tmp_path / "artifacts")
    parent = tracker.start_parent(experiment, "parent", {})
    tags = {"sslab.checkpoint": str(tmp_path / "trial" / CHECKPOINT_NAME)}
    spec = TrialTracking(tracking_uri, experiment, parent, "seed=0", tags=tags)
    metrics = train_loop(trial_spec(build_study(tiny_raw), tmp_path / "trial", spec))
    for key in (
        "eval/knn_top1",
        "eval/linear_top1",
        "eval/linear_top1_25pct",
        "eval/finetune_top1",
        "eval/finetune_top1_25pct",
    ):
        assert 0 <= metrics[key] <= 1
    run = tracker.child_runs(experiment, parent)[0]
    for key in (
        "random_init_knn_top1",
        "random_init_linear_top1",
        "random_init_finetune_top1_25pct",
        "eval/linear_top5",
    ):
        assert key in run.data.metrics
    subsets = tracker.client.download_artifacts(run.info.run_id, "eval/label_subsets.json")
    from sslab.platform.data import load_dataset

    train_labels = load_dataset(build_study(tiny_raw).data).train_labels
    saved = __import__("json").load(open(subsets))["labels_25pct"]
    assert saved == balanced_subset(train_labels, 0.25, seed=0).tolist()  # the subset used, saved

    # `sslab eval RUN` on the same checkpoint, with another protocol set
    code = main(
        [
            "eval",
            run.info.run_id,
            "--tracking-uri",
            tracking_uri,
            "--protocol",
            "linear",
            "--label-fraction",
            "0.5",
            "--random-init",
        ]
    )
    assert code == 0
    logged = tracker.client.get_run(run.info.run_id).data.metrics
    assert "eval/linear_top1_50pct" in logged and "eval/random_init_linear_top1_50pct" in logged


def test_eval_of_an_unknown_run_is_a_clear_error(tracking_uri, capsys):
    assert main(["eval", "0" * 32, "--tracking-uri", tracking_uri]) == 2
    assert "no MLflow run" in capsys.readouterr().err


def test_label_fractions_are_validated(tiny_raw):
    from sslab.platform.config import ConfigError

    tiny_raw["eval"]["label_fractions"] = [0.1, 1.5]
    with pytest.raises(ConfigError, match=r"eval.label_fractions\[1\]"):
        build_study(tiny_raw)


def test_knn_runs_even_when_not_listed(tmp_path, tiny_raw):
    """kNN is the monitor reports and schedulers read: a study listing only `linear` still has it."""
    tiny_raw["eval"]["protocols"] = ["linear"]
    tiny_raw["train"]["epochs"] = 1
    metrics = train_loop(trial_spec(build_study(tiny_raw), tmp_path, None))
    assert 0 <= metrics["eval/knn_top1"] <= 1 and 0 <= metrics["eval/linear_top1"] <= 1


@pytest.mark.parametrize(
    "name, args, part",
    [
        ("dino", {"out_dim": 16}, "teacher_backbone"),
        ("simclr", {"eval_on": "z"}, "head"),
        ("colorization", {}, "backbone"),
        ("split_brain", {}, "ab_backbone"),
    ],
)
def test_every_protocol_measures_the_methods_encoder(make_method, name, args, part):
    """kNN and the probe read `features`, fine-tuning trains a copy of `encoder().module` on the
    encoder's own transform: the same network (the teacher, z, the L channel, both halves)."""
    from sslab.platform.evaluate import finetune

    method, data = make_method(name, **args)
    method.eval()
    encoder = method.encoder()
    assert any(m is getattr(method, part) for m in encoder.module.modules())
    images = data.test_images[:8]
    features = method.features(images)
    assert features.shape == (8, encoder.dim)
    transformed = []
    spy = type(encoder)(encoder.module, encoder.dim, lambda x: transformed.append(x) or encoder.transform(x))
    finetune(
        spy,
        data.train_images[:32],
        data.train_labels[:32],
        images,
        data.test_labels[:8],
        10,
        torch.device("cpu"),
        epochs=1,
        batch_size=16,
    )
    assert len(transformed) >= 3  # two training batches and the test pass
    assert torch.allclose(encoder.module(encoder.transform(images)), features)
