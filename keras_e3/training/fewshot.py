"""Few-shot transfer: a closed-form linear probe of pre-logit features.

This follows the few-shot evaluator of vmoe / big_vision (the one behind
the V-MoE and E³ papers' few-shot numbers):

- features: the backbone's `pooled_output` (after pre-logits), the model
  in inference mode;
- k-shot training set: `keras_e3.data.sample_k_shot(labels, k, seed)`,
  their sampler (per class, a seeded permutation, first k);
- whitening with the training set's mean and std (+1e-5), then a constant
  feature of 100 for the bias ("large so it's almost unregularized");
- targets 2 * one_hot - 1 (in {-1, 1});
- ridge regression w = (X^T X + l2 I)^-1 X^T Y (or the equivalent dual
  form X^T (X X^T + l2 I)^-1 Y when there are fewer points than
  features), in float64 here; prediction argmax(X_test w).
- default l2: 2^10, big_vision's few-shot config (vmoe sweeps a list and
  keeps the best on the test set: pass a list to `fewshot_evaluate`).

E³ (M members): every member's features get their own probe
(`member_accuracy`). `ensemble_accuracy` averages the members' probe
scores before the argmax: a probe's scores are least-squares fits of
{-1, 1} targets, not logits, so the mean of the scores is the
prediction-level ensemble (a softmax of them would add an arbitrary
temperature). `concat_accuracy` fits one probe on the concatenated member
features, the convention of uncertainty-baselines' efficient-ensemble
few-shot evaluators ("a single linear regressor is applied over all
dimensions"). For a single model (M = 1) all three coincide.
"""

import numpy as np

from keras_e3.data.sampling import sample_k_shot
from keras_e3.models.backbone import E3ViTBackbone

DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_L2_REG = 2.0 ** 10
BIAS_CONSTANT = 100.0
STD_EPSILON = 1e-5


def extract_features(model, images, batch_size=32, verbose=0):
    """Pre-logit features [N, M, D] (M = 1 for ViT / V-MoE) as NumPy.

    `model` is an `E3ViT` or an `E3ViTBackbone`; features are its
    `pooled_output` from `predict` (inference mode), reshaped from the
    backbone's [N*M, D] (row n*M + m) to [N, M, D]. Routing groups span
    a batch, so with token dropping the features depend on `batch_size`,
    as in vmoe.

    `images`: for an `E3ViT`, raw images of any kind its `predict` takes
    (arrays of any size, lists of them, paths, bytes, a `tf.data.Dataset`),
    taken through its converter (`model.preprocess`); a backbone takes
    model-ready images only.
    """
    backbone = getattr(model, "backbone", model)
    if not isinstance(backbone, E3ViTBackbone):
        raise ValueError("extract_features expects an E3ViT or E3ViTBackbone;"
                         f" got {type(model).__name__}.")
    if hasattr(model, "preprocess"):
        images = model.preprocess(images, batch_size=batch_size)
    outputs = backbone.predict(images, batch_size=batch_size, verbose=verbose)
    pooled = np.asarray(outputs["pooled_output"])
    return pooled.reshape(-1, backbone.ensemble_size, pooled.shape[-1])


def fit_ridge_probe(features, labels, num_classes, l2_reg=DEFAULT_L2_REG):
    """The closed-form probe of one feature set [N, D].

    Returns {"weights": [D+1, C] (last row: bias feature), "mean": [D],
    "std": [D]}; scores of new features are `probe_scores(probe, x)`.
    """
    x = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(labels):
        raise ValueError(f"features must be [N, D] with N = len(labels); got "
                         f"{x.shape} and {len(labels)} labels.")
    if l2_reg < 0:
        raise ValueError(f"l2_reg must be >= 0; got {l2_reg}.")
    mean = x.mean(axis=0)
    std = x.std(axis=0) + STD_EPSILON
    x = _with_bias((x - mean) / std)
    y = 2.0 * np.eye(num_classes)[labels] - 1.0
    n, d = x.shape
    if n >= d:  # primal: (X^T X + l2 I)^-1 X^T Y
        w = np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ y)
    else:  # dual: X^T (X X^T + l2 I)^-1 Y
        w = x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), y)
    return {"weights": w, "mean": mean, "std": std}


def probe_scores(probe, features):
    """Scores [N, C] of features [N, D] under a `fit_ridge_probe` probe."""
    x = (np.asarray(features, np.float64) - probe["mean"]) / probe["std"]
    return _with_bias(x) @ probe["weights"]


def linear_probe(train_features, train_labels, test_features, test_labels,
                 l2_reg=DEFAULT_L2_REG, num_classes=None):
    """Fits the probes on the training features and scores the test set.

    Features are [N, D] (one model) or [N, M, D] (E³ members). Returns a
    dict: `member_accuracy` (list of M), `ensemble_accuracy` (mean of the
    members' scores), `concat_accuracy` (one probe on the concatenated
    features), `accuracy` (= ensemble_accuracy) and `probes` (the M
    member probes, see `fit_ridge_probe`).
    """
    train, test = _as_members(train_features), _as_members(test_features)
    train_labels = np.asarray(train_labels).astype(np.int64)
    test_labels = np.asarray(test_labels).astype(np.int64)
    if train.shape[1:] != test.shape[1:]:
        raise ValueError(f"train features {train.shape[1:]} and test features"
                         f" {test.shape[1:]} differ in [M, D].")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    probes, scores = [], []
    for m in range(train.shape[1]):
        probe = fit_ridge_probe(train[:, m], train_labels, num_classes, l2_reg)
        probes.append(probe)
        scores.append(probe_scores(probe, test[:, m]))
    member_acc = [_accuracy(s, test_labels) for s in scores]
    ensemble_acc = _accuracy(np.mean(scores, axis=0), test_labels)
    if train.shape[1] == 1:
        concat_acc = ensemble_acc
    else:
        concat = fit_ridge_probe(train.reshape(len(train), -1), train_labels,
                                 num_classes, l2_reg)
        concat_acc = _accuracy(
            probe_scores(concat, test.reshape(len(test), -1)), test_labels)
    return {"member_accuracy": member_acc, "ensemble_accuracy": ensemble_acc,
            "concat_accuracy": concat_acc, "accuracy": ensemble_acc,
            "probes": probes}


def fewshot_evaluate(model, train, test, shots=DEFAULT_SHOTS, seeds=(0,),
                     l2_reg=DEFAULT_L2_REG, batch_size=32, num_classes=None):
    """k-shot linear-probe accuracy of a model's features.

    Args:
        model: an `E3ViT` / `E3ViTBackbone`, or None when `train` and
            `test` hold features ([N, D] or [N, M, D]) instead of images.
        train, test: `(images, labels)` pairs; labels are class indices.
            Images are raw images of any kind the model's `predict`
            takes (arrays of any size, lists of images of different sizes,
            paths, bytes), taken through its converter
            (`model.preprocessor`), or model-ready images. Only the
            sampled training images go through the model.
        shots: the k of each k-shot task.
        seeds: sampling seeds; accuracies are averaged over them.
        l2_reg: a float, or a list to sweep: each shot then reports the
            best value by mean ensemble accuracy on the test set, as vmoe
            does (an optimistic, test-selected number; `by_l2` has all).
        batch_size: feature extraction batch size.

    Returns:
        {"shots", "seeds", "ensemble_size", "num_classes", "results"}, with
        `results[k]` = {"member_accuracy", "ensemble_accuracy",
        "concat_accuracy", "accuracy", "l2_reg", "per_seed", "by_l2"}.
    """
    (x_train, y_train), (x_test, y_test) = train, test
    y_train = np.asarray(y_train).astype(np.int64)
    y_test = np.asarray(y_test).astype(np.int64)
    if num_classes is None:
        num_classes = int(max(y_train.max(), y_test.max())) + 1
    l2_regs = (list(l2_reg) if isinstance(l2_reg, (list, tuple, np.ndarray))
               else [float(l2_reg)])
    if not l2_regs:
        raise ValueError("l2_reg must be a float or a non-empty list.")
    classes = np.arange(num_classes)
    indices = {(s, k): sample_k_shot(y_train, k, seed=s, classes=classes)
               for s in seeds for k in shots}
    needed = np.unique(np.concatenate(list(indices.values())))
    position = {int(i): p for p, i in enumerate(needed)}
    if model is None:
        train_feats = _as_members(np.asarray(x_train)[needed])
        test_feats = _as_members(x_test)
    else:
        train_feats = extract_features(model, _take(x_train, needed),
                                       batch_size=batch_size)
        test_feats = extract_features(model, x_test, batch_size=batch_size)
    results = {}
    for k in shots:
        by_l2 = {}
        for l2 in l2_regs:
            runs = []
            for s in seeds:
                rows = [position[int(i)] for i in indices[s, k]]
                run = linear_probe(train_feats[rows], y_train[indices[s, k]],
                                   test_feats, y_test, l2_reg=l2,
                                   num_classes=num_classes)
                run.pop("probes")
                runs.append(run)
            by_l2[l2] = runs
        best = max(l2_regs, key=lambda l2: np.mean(
            [r["ensemble_accuracy"] for r in by_l2[l2]]))
        runs = by_l2[best]
        results[k] = {
            "member_accuracy": np.mean(
                [r["member_accuracy"] for r in runs], axis=0).tolist(),
            "ensemble_accuracy": _mean(runs, "ensemble_accuracy"),
            "concat_accuracy": _mean(runs, "concat_accuracy"),
            "accuracy": _mean(runs, "ensemble_accuracy"),
            "l2_reg": best,
            "per_seed": dict(zip(seeds, runs)),
            "by_l2": {l2: _mean(r, "ensemble_accuracy")
                      for l2, r in by_l2.items()},
        }
    return {"shots": list(shots), "seeds": list(seeds),
            "ensemble_size": train_feats.shape[1], "num_classes": num_classes,
            "results": results}


def _take(images, indices):
    """The images at `indices` of a batch array or of a list of images
    (sizes may differ), keeping the kind."""
    if isinstance(images, (list, tuple)):
        return [images[int(i)] for i in indices]
    return np.asarray(images)[indices]


def _as_members(features):
    features = np.asarray(features)
    if features.ndim == 2:
        return features[:, None, :]
    if features.ndim != 3:
        raise ValueError(f"features must be [N, D] or [N, M, D]; got shape "
                         f"{features.shape}.")
    return features


def _with_bias(x):
    return np.concatenate([x, np.full((len(x), 1), BIAS_CONSTANT)], axis=1)


def _accuracy(scores, labels):
    return float(np.mean(np.argmax(scores, axis=1) == labels))


def _mean(runs, key):
    return float(np.mean([r[key] for r in runs]))
