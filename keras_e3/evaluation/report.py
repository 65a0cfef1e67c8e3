"""A model's report on a dataset: accuracy, calibration, diversity, OOD
detection, cost and routing, as a dict, a JSON file and PNG plots
(`keras-e3 evaluate`, see `keras_e3.cli.evaluate`).

`evaluate(model, images, labels, ood_images=None, out_dir=None)` returns
the report dict (and writes `DIR/report.json` and the plots when `out_dir`
is given).

The report (`report.json`, written atomically) holds:
  - "metrics": every value of `keras_e3.metrics.evaluate_predictions` on
    the model's logits: "ensemble/{accuracy,nll,ece,brier}" and the same
    for each "member_{m}"; for M > 1 "disagreement",
    "normalized_disagreement" (null when the ensemble makes no error) and
    "average_kl";
  - "ood" (with OOD data): for each score ("msp", "entropy", "max_logit"
    and, for M > 1, "mutual_information"; higher = more likely OOD, see
    `keras_e3.metrics.ood`) its "auroc", "aupr" and "fpr_at_95_tpr". MSP
    and entropy score the ensemble's mean probabilities, max logit the
    members' mean logits;
  - "cost": `keras_e3.count_flops(model)`: params, MACs and FLOPs per
    image (with the per-part breakdown);
  - "routing" (MoE models): per MoE block, the fraction of token copies
    each expert processes, the member (partition) of each expert and the
    fraction of token copies dispatched to no expert ("dropped"); for
    Experts Choice the tokens taken by no expert and the distribution of
    experts per token, for Soft MoE each expert's mean combine weight (see
    `keras_e3.evaluation.routing_stats`);
  - "preset", "dataset", "ood_dataset", "num_examples", "num_ood_examples",
    "num_classes", "class_names", "ensemble_size", "num_bins", "backend",
    versions, and "plots" (file names relative to the report's folder, or
    null with the reason in "skipped_plots").
"""

import os

import keras
import numpy as np

import keras_e3
from keras_e3 import metrics as e3_metrics
from keras_e3.evaluation import plots as plotting
from keras_e3.evaluation.flops import count_flops
from keras_e3.evaluation.routing import TOKEN_ARRAYS
from keras_e3.evaluation.routing import routing_stats
from keras_e3.io_utils import json_safe
from keras_e3.io_utils import write_json_atomic
from keras_e3.layers.ensemble import ensemble_log_probs

REPORT_FILE = "report.json"
ROUTING_MAP_IMAGES = 4
ROUTING_MAX_EXAMPLES = 1024
PLOT_FILES = {"reliability": "reliability.png",
              "member_metrics": "member_metrics.png",
              "routing_maps": "routing_maps.png",
              "expert_load": "expert_load.png",
              "ood_scores": "ood_scores.png"}


def check_labels(labels, num_classes, spec):
    labels = np.asarray(labels)
    if labels.size == 0:
        raise ValueError(f"Dataset {spec!r} is empty.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"Dataset {spec!r} has {int(labels.max()) + 1} classes but the "
            f"model predicts {num_classes}.")


def evaluate(model, images, labels, ood_images=None, out_dir=None,
             class_names=None, plots=True, batch_size=64, num_bins=15,
             info=None):
    """Evaluates `model` (an `E3ViT`) on `images` [N, H, W, C] / `labels`
    [N]; returns the report dict (module doc).

    With `out_dir`, writes `out_dir/report.json` and (`plots=True`, needs
    matplotlib) the PNG plots. `info` adds entries to the report ("preset",
    "dataset", "ood_dataset").

    Args:
        model: an `E3ViT` (with its converter).
        images: raw images of any kind `model.predict` takes, or
            model-ready images [N, H, W, C].
        labels: integer labels [N].
        ood_images: out-of-distribution images, for the OOD scores (None:
            none).
        out_dir: a directory for report.json (and plots); None: nothing
            written.
        class_names: the classes' names (default: the model's).
        plots: write the PNG plots to `out_dir` (needs matplotlib).
        batch_size: images per `predict` call.
        num_bins: ECE bins.
        info: more entries for the report.

    Returns:
        The report dict.

    Example:
    ```python
    import keras_e3
    from keras_e3 import data

    model = keras_e3.E3ViT.from_preset("e3_tiny_digits")
    images, labels, _ = data.load_raw_dataset("digits", split="test")
    images, labels = images[:16], labels[:16]

    from keras_e3 import evaluation

    report = evaluation.evaluate(model, images, labels, plots=False)
    sorted(report)
    ```
    """
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels).reshape(-1)
    if images.ndim != 4 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"images must be [N, H, W, C] with one label each; "
                         f"got images {images.shape} and labels "
                         f"{labels.shape}.")
    check_labels(labels, model.num_classes, "images")
    logits = model.predict_members(images, batch_size)
    metrics = e3_metrics.evaluate_predictions(logits, labels,
                                               num_bins=num_bins)
    m = logits.shape[1]
    report = {"preset": None, "dataset": None, "ood_dataset": None,
              **(info or {}),
              "num_examples": int(labels.shape[0]),
              "num_classes": int(model.num_classes),
              "class_names": (list(map(str, class_names))
                              if class_names is not None else None),
              "ensemble_size": int(m),
              "num_bins": int(num_bins),
              "backend": keras.backend.backend(),
              "keras_version": keras.__version__,
              "keras_e3_version": keras_e3.__version__,
              "metrics": metrics}
    ood_logits = None
    if ood_images is not None:
        ood_images = np.asarray(ood_images, dtype=np.float32)
        if ood_images.ndim != 4 or ood_images.shape[1:] != images.shape[1:]:
            raise ValueError(f"OOD images must be shaped like the images "
                             f"(*, {', '.join(map(str, images.shape[1:]))}); "
                             f"got {ood_images.shape}.")
        ood_logits = model.predict_members(ood_images, batch_size)
        report["num_ood_examples"] = int(ood_images.shape[0])
        report["ood"] = ood_metrics(logits, ood_logits)
    cost = count_flops(model)
    report["cost"] = {"params": cost["params"], "macs": cost["macs"],
                      "flops": cost["flops"],
                      "breakdown": cost["breakdown"]}
    routing = None
    if model.backbone.moe_layers:
        routing = routing_stats(model, images[:ROUTING_MAX_EXAMPLES],
                                batch_size)
        report["routing"] = {
            name: {k: v for k, v in r.items()
                   if k not in TOKEN_ARRAYS}
            for name, r in routing["layers"].items()}
        report["routing_examples"] = routing["num_examples"]
    else:
        report["routing"] = {}
    report["plots"] = {}
    report["skipped_plots"] = {}
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        if plots:
            report["plots"], report["skipped_plots"] = _make_plots(
                model, images, labels, logits, ood_logits, routing, metrics,
                out_dir, num_bins)
        else:
            report["skipped_plots"] = {k: "plots disabled"
                                       for k in PLOT_FILES}
    report = json_safe(report)
    if out_dir is not None:
        write_json_atomic(os.path.join(out_dir, REPORT_FILE), report)
    return report


def ood_metrics(in_logits, out_logits):
    """{score: {"auroc", "aupr", "fpr_at_95_tpr"}} from member logits
    [N, M, C] of in-distribution and OOD examples.

    Args:
        in_logits: member logits [N, M, C] of in-distribution examples.
        out_logits: member logits [N', M, C] of OOD examples.

    Returns:
        A dict {score name: {"auroc", "aupr", "fpr_at_95_tpr"}}.

    Example:
    ```python
    import numpy as np

    from keras_e3 import evaluation

    rng = np.random.default_rng(0)
    in_logits = rng.normal(size=(8, 2, 3)) * 4  # confident: in-distribution
    out_logits = rng.normal(size=(8, 2, 3))
    scores = evaluation.ood_metrics(in_logits, out_logits)
    sorted(scores["msp"])  # ["aupr", "auroc", "fpr_at_95_tpr"]
    ```
    """
    out = {}
    for name, (s_in, s_out) in ood_scores(in_logits, out_logits).items():
        out[name] = {"auroc": e3_metrics.auroc(s_in, s_out),
                     "aupr": e3_metrics.aupr(s_in, s_out),
                     "fpr_at_95_tpr": e3_metrics.fpr_at_95_tpr(s_in, s_out)}
    return out


def ood_scores(in_logits, out_logits):
    """{score name: (in-distribution scores, OOD scores)}."""

    scores = {}
    probs = (e3_metrics.softmax(in_logits), e3_metrics.softmax(out_logits))
    scores["msp"] = tuple(e3_metrics.msp_score(p) for p in probs)
    scores["entropy"] = tuple(e3_metrics.entropy_score(p) for p in probs)
    scores["max_logit"] = tuple(
        e3_metrics.max_logit_score(np.mean(np.asarray(x, np.float64), axis=1))
        for x in (in_logits, out_logits))
    if in_logits.shape[1] > 1:
        scores["mutual_information"] = tuple(
            e3_metrics.mutual_information_score(p) for p in probs)
    return scores


def _make_plots(model, images, labels, logits, ood_logits, routing, metrics,
                out_dir, num_bins):

    made, skipped = {}, {}

    def path(key):
        made[key] = PLOT_FILES[key]
        return os.path.join(out_dir, PLOT_FILES[key])

    member_probs = e3_metrics.softmax(logits)
    plotting.reliability_diagram(member_probs, labels, path("reliability"),
                                 num_bins=num_bins)
    plotting.member_metrics(metrics, logits.shape[1], path("member_metrics"))
    backbone = model.backbone
    if routing is None:
        reason = "dense ViT: no MoE layers, no routing"
        skipped["routing_maps"] = skipped["expert_load"] = reason
    else:
        emb = backbone.embedding
        count = min(ROUTING_MAP_IMAGES, images.shape[0])
        converter = getattr(model, "preprocessor", None)
        plotting.routing_maps(
            routing.get("images", images)[:count],  # what was routed
            {k: v["top_expert"][:count, :, emb.num_prefix_tokens:]
             for k, v in routing["layers"].items()},
            emb.grid_size, backbone.num_experts, backbone.ensemble_size,
            path("routing_maps"), labels=labels[:count],
            value_range=(None if converter is None
                         else converter.value_range),
            router=backbone.router)
        plotting.expert_load(
            routing["layers"], backbone.ensemble_size, path("expert_load"),
            num_examples=routing["num_examples"])
    if ood_logits is not None:
        plotting.ood_histograms(ood_scores(logits, ood_logits),
                                path("ood_scores"))
    else:
        skipped["ood_scores"] = "no OOD data"
    return made, skipped


def describe_members(member_logits, class_names=None, top_k=3):
    """Lines describing each member's and the ensemble's top-k classes for
    one image's member logits [M, C].

    Args:
        member_logits: one image's member logits [M, C].
        class_names: the classes' names (None: their indices).
        top_k: classes listed per line.

    Returns:
        A list of strings: one per member, then the ensemble.

    Example:
    ```python
    import numpy as np

    from keras_e3 import evaluation

    member_logits = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # [M, C]
    for line in evaluation.describe_members(member_logits, ["a", "b", "c"],
                                            top_k=2):
        print(line)
    ```
    """
    member_logits = np.asarray(member_logits)
    names = class_names or [f"class {i}"
                            for i in range(member_logits.shape[-1])]
    ensemble = np.exp(np.asarray(keras.ops.convert_to_numpy(
        ensemble_log_probs(member_logits[None]))))[0]
    lines = []
    for m, logits in enumerate(member_logits):
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        best = int(probs.argmax())
        lines.append(f"member {m}: {names[best]} (p={probs[best]:.3f})")
    top = np.argsort(-ensemble)[:top_k]
    lines.append("ensemble: " + ", ".join(
        f"{names[i]} (p={ensemble[i]:.3f})" for i in top))
    return lines


def summary(report):
    """A few human-readable lines about a report.

    Args:
        report: an `evaluate` report.

    Returns:
        A list of strings.

    Example:
    ```python
    import keras_e3
    from keras_e3 import data

    model = keras_e3.E3ViT.from_preset("e3_tiny_digits")
    images, labels, _ = data.load_raw_dataset("digits", split="test")
    images, labels = images[:16], labels[:16]

    from keras_e3 import evaluation

    report = evaluation.evaluate(model, images, labels, plots=False)
    for line in evaluation.summary(report):
        print(line)
    ```
    """
    metrics = report["metrics"]
    m = report["ensemble_size"]
    lines = [f"{report.get('preset') or 'model'} on "
             f"{report.get('dataset') or 'data'}: "
             f"{report['num_examples']} examples, M={m}, "
             f"{report['cost']['flops'] / 1e6:.2f} MFLOPs/image, "
             f"{report['cost']['params']:,} params "
             f"({report['backend']})"]

    def row(prefix, label):
        return (f"  {label:<10} acc {metrics[prefix + '/accuracy']:.4f}  "
                f"NLL {metrics[prefix + '/nll']:.4f}  "
                f"ECE {metrics[prefix + '/ece']:.4f}  "
                f"Brier {metrics[prefix + '/brier']:.4f}")

    lines.append(row("ensemble", "ensemble" if m > 1 else "model"))
    if m > 1:
        lines += [row(f"member_{i}", f"member {i}") for i in range(m)]
        lines.append(f"  disagreement {metrics['disagreement']:.4f}")
    for name, values in (report.get("ood") or {}).items():
        lines.append(f"  OOD ({report.get('ood_dataset') or 'ood'}) "
                     f"{name:<18} AUROC {values['auroc']:.4f}  "
                     f"AUPR {values['aupr']:.4f}  "
                     f"FPR@95 {values['fpr_at_95_tpr']:.4f}")
    for name, r in (report.get("routing") or {}).items():
        load = ", ".join(f"{v:.2f}" for v in r["expert_load"])
        router = r.get("router", "top_k")
        if router == "soft":
            lines.append(f"  {name}: expert weight [{load}], top expert "
                         f"weight {r['mean_top_expert_weight']:.2f}")
        else:
            dropped = ("taken by no expert" if router == "experts_choice"
                       else "dropped")
            lines.append(f"  {name}: expert load [{load}], "
                         f"{dropped} {r['dropped_fraction']:.2%}")
    for key, reason in (report.get("skipped_plots") or {}).items():
        lines.append(f"  plot {key} skipped: {reason}")
    return "\n".join(lines)
