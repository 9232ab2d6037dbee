import numpy as np
import pytest
import torch
from torch import nn

from sslab.platform.evaluate import eval_mode, extract_features, knn_accuracy, knn_predict_scores


def test_weighted_knn_agrees_with_scikit_learn():
    """Weighted kNN (Wu et al. 2018): neighbours by cosine similarity, votes exp(s / T).
    scikit-learn's KNeighborsClassifier with cosine distance d = 1 - s and weights exp((1-d)/T)
    must predict the same classes."""
    from sklearn.neighbors import KNeighborsClassifier

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g)
    train_y = torch.randint(0, 5, (400,), generator=g)
    test_y = torch.randint(0, 5, (200,), generator=g)
    train_x = centres[train_y] + 1.2 * torch.randn(400, 16, generator=g)
    test_x = centres[test_y] + 1.2 * torch.randn(200, 16, generator=g)
    k, t = 20, 0.1
    ours = knn_predict_scores(train_x, train_y, test_x, 5, k=k, temperature=t).argmax(1).numpy()
    sk = KNeighborsClassifier(
        n_neighbors=k, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / t)
    ).fit(train_x.numpy(), train_y.numpy())
    agreement = (sk.predict(test_x.numpy()) == ours).mean()
    assert agreement >= 0.99  # ties in float rounding aside
    acc = knn_accuracy(train_x, train_y, test_x, test_y, 5, k=k, temperature=t)
    assert acc["knn_top1"] == pytest.approx((ours == test_y.numpy()).mean())
    assert acc["knn_top5"] == 1.0


def test_features_are_extracted_in_eval_mode_and_mode_is_restored():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4))
    net.train()
    seen = []

    def features(x):
        seen.append(net.training)
        return net(x.float())

    with eval_mode(net):
        extract_features(
            features, torch.zeros(10, 3, 2, 2, dtype=torch.uint8), torch.device("cpu"), batch_size=4
        )
    assert seen == [False, False, False] and net.training
    assert torch.equal(net[2].running_mean, torch.zeros(4))  # eval: BN statistics untouched
