"""`keras-e3 evaluate`: accuracy, calibration, diversity, OOD detection,
cost and routing of a model on a dataset, as a JSON report and PNG plots.

    keras-e3 evaluate --preset P --data D [--ood-data D2] --out DIR
                      [--batch-size 64] [--num-bins 15] [--max-examples N]

Python: `evaluate(model, images, labels, ood_images=None, out_dir=None)`
returns the report dict (and writes `DIR/report.json` and the plots when
`out_dir` is given).

Datasets (`--data`, see `keras_e3.data.load_dataset`): "digits" (the
test split of scikit-learn's digits, as the `*_tiny_digits` presets) or a
folder of class sub-folders of images. `--ood-data` additionally accepts
"noise" (uniform noise in the model's value range, as many images as
`--data`, fixed seed), "digits-inverted" (the digits with their values
mirrored within the value range: white digits on black become black on
white), "digits-rotated" (each digit rotated by 90 degrees) and a folder
(its labels are ignored).

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
  - "cost": `keras_e3.flops.count_flops(model)`: params, MACs and FLOPs per
    image (with the per-part breakdown);
  - "routing" (MoE models): per MoE block, the fraction of token copies
    each expert processes, the member (partition) of each expert and the
    fraction of token copies dispatched to no expert ("dropped");
  - "preset", "dataset", "ood_dataset", "num_examples", "num_ood_examples",
    "num_classes", "class_names", "ensemble_size", "num_bins", "backend",
    versions, and "plots" (file names relative to the report's folder, or
    null with the reason in "skipped_plots").
"""

import os

import numpy as np

from keras_e3.io_utils import json_safe
from keras_e3.io_utils import write_json_atomic

REPORT_FILE = "report.json"
OOD_TRANSFORMS = ("inverted", "rotated")
NOISE_SEED = 0
ROUTING_MAP_IMAGES = 4
ROUTING_MAX_EXAMPLES = 1024
PLOT_FILES = {"reliability": "reliability.png",
              "member_metrics": "member_metrics.png",
              "routing_maps": "routing_maps.png",
              "expert_load": "expert_load.png",
              "ood_scores": "ood_scores.png"}


# --------------------------------------------------------------------------
# Command line


def add_arguments(parser):
    """Adds the `evaluate` options to an argparse (sub)parser."""
    parser.add_argument("--preset", required=True,
                        help="preset name, preset directory or "
                             "hf://owner/repo")
    parser.add_argument("--data", required=True,
                        help='"digits" or a folder of class sub-folders')
    parser.add_argument("--ood-data", default=None,
                        help='out-of-distribution data: "noise", '
                             '"digits-inverted", "digits-rotated" or a '
                             "folder of images (labels ignored)")
    parser.add_argument("--out", required=True,
                        help="output folder (report.json and PNG plots)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-bins", type=int, default=15,
                        help="calibration bins (ECE, reliability diagram)")
    parser.add_argument("--max-examples", type=int, default=None,
                        help="evaluate only the first N examples (and N OOD "
                             "examples)")
    parser.add_argument("--no-plots", action="store_true",
                        help="write the report only")
    return parser


def run(args):
    """Runs `keras-e3 evaluate` with parsed `args`; returns 0.

    Raises ValueError (or `PresetError`, a ValueError) for bad input.
    """
    from keras_e3.data import load_dataset
    from keras_e3.models.e3vit import E3ViT

    batch_size = _positive(getattr(args, "batch_size", 64), "--batch-size")
    num_bins = _positive(getattr(args, "num_bins", 15), "--num-bins")
    max_examples = getattr(args, "max_examples", None)
    if max_examples is not None:
        max_examples = _positive(max_examples, "--max-examples")
    ood_spec = getattr(args, "ood_data", None)
    _check_dataset_spec(args.data, "--data", ood=False)
    if ood_spec is not None:
        _check_dataset_spec(ood_spec, "--ood-data", ood=True)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} exists and is not a folder.")

    model = E3ViT.from_preset(args.preset)
    preprocessor = getattr(model, "preprocessor_config", None) or {}
    images, labels, class_names = load_dataset(args.data, preprocessor,
                                               split="test")
    if max_examples is not None:
        images, labels = images[:max_examples], labels[:max_examples]
    _check_labels(labels, model.num_classes, args.data)
    ood_images = None
    if ood_spec is not None:
        ood_images = load_ood_dataset(ood_spec, preprocessor, images)
        if max_examples is not None:
            ood_images = ood_images[:max_examples]
    report = evaluate(
        model, images, labels, ood_images=ood_images, out_dir=args.out,
        class_names=class_names, plots=not getattr(args, "no_plots", False),
        batch_size=batch_size, num_bins=num_bins,
        info={"preset": os.fspath(args.preset), "dataset": args.data,
              "ood_dataset": ood_spec})
    print(summary(report))
    print(f"report: {os.path.join(args.out, REPORT_FILE)}")
    return 0


def _positive(value, name):
    if value is None or int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    return int(value)


def _check_dataset_spec(spec, option, ood):
    from keras_e3.data.folder import BUILTIN_DATASETS

    if os.path.isdir(os.fspath(spec)) or spec in BUILTIN_DATASETS:
        return
    if ood and (spec == "noise" or _ood_transform(spec) is not None):
        return
    known = list(BUILTIN_DATASETS)
    if ood:
        known += ["noise"] + [f"{d}-{t}" for d in BUILTIN_DATASETS
                              for t in OOD_TRANSFORMS]
    looks_like_path = os.sep in spec or spec.startswith(".")
    what = "No such folder" if looks_like_path else "Unknown dataset"
    raise ValueError(f"{option}: {what} {spec!r}. Expected one of "
                     f"{', '.join(known)} or a folder of class sub-folders "
                     "of images.")


def _ood_transform(spec):
    from keras_e3.data.folder import BUILTIN_DATASETS

    base, _, transform = spec.rpartition("-")
    if transform in OOD_TRANSFORMS and base in BUILTIN_DATASETS:
        return base, transform
    return None


def _check_labels(labels, num_classes, spec):
    labels = np.asarray(labels)
    if labels.size == 0:
        raise ValueError(f"Dataset {spec!r} is empty.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"Dataset {spec!r} has {int(labels.max()) + 1} classes but the "
            f"model predicts {num_classes}.")


def load_ood_dataset(spec, preprocessor, images):
    """OOD images for `spec` (module doc); `images` is the in-distribution
    set, whose count and shape "noise" copies."""
    from keras_e3.data import load_dataset

    low, high = [float(v) for v in preprocessor.get("value_range",
                                                    (-1.0, 1.0))]
    if spec == "noise":
        rng = np.random.default_rng(NOISE_SEED)
        return rng.uniform(low, high, size=images.shape).astype(np.float32)
    if not os.path.isdir(os.fspath(spec)):
        parsed = _ood_transform(spec)
        if parsed is None:
            _check_dataset_spec(spec, "--ood-data", ood=True)
        base, transform = parsed
        x, _, _ = load_dataset(base, preprocessor, split="test")
        if transform == "inverted":
            return (low + high - x).astype(np.float32)
        return np.ascontiguousarray(np.rot90(x, k=1, axes=(1, 2)))
    x, _, _ = load_dataset(spec, preprocessor, split="test")
    return x


# --------------------------------------------------------------------------
# Evaluation


def evaluate(model, images, labels, ood_images=None, out_dir=None,
             class_names=None, plots=True, batch_size=64, num_bins=15,
             info=None):
    """Evaluates `model` (an `E3ViT`) on `images` [N, H, W, C] / `labels`
    [N]; returns the report dict (module doc).

    With `out_dir`, writes `out_dir/report.json` and (`plots=True`, needs
    matplotlib) the PNG plots. `info` adds entries to the report ("preset",
    "dataset", "ood_dataset").
    """
    import keras

    import keras_e3
    from keras_e3.flops import count_flops
    from keras_e3.metrics import evaluate_predictions

    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels).reshape(-1)
    if images.ndim != 4 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"images must be [N, H, W, C] with one label each; "
                         f"got images {images.shape} and labels "
                         f"{labels.shape}.")
    _check_labels(labels, model.num_classes, "images")
    logits = model.predict_members(images, batch_size)
    metrics = evaluate_predictions(logits, labels, num_bins=num_bins)
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
                   if k not in ("top_expert", "dropped")}
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
    [N, M, C] of in-distribution and OOD examples."""
    from keras_e3.metrics import aupr
    from keras_e3.metrics import auroc
    from keras_e3.metrics import fpr_at_95_tpr

    out = {}
    for name, (s_in, s_out) in ood_scores(in_logits, out_logits).items():
        out[name] = {"auroc": auroc(s_in, s_out), "aupr": aupr(s_in, s_out),
                     "fpr_at_95_tpr": fpr_at_95_tpr(s_in, s_out)}
    return out


def ood_scores(in_logits, out_logits):
    """{score name: (in-distribution scores, OOD scores)}."""
    from keras_e3.metrics import entropy_score
    from keras_e3.metrics import max_logit_score
    from keras_e3.metrics import msp_score
    from keras_e3.metrics import mutual_information_score
    from keras_e3.metrics import softmax

    scores = {}
    probs = (softmax(in_logits), softmax(out_logits))
    scores["msp"] = tuple(msp_score(p) for p in probs)
    scores["entropy"] = tuple(entropy_score(p) for p in probs)
    scores["max_logit"] = tuple(
        max_logit_score(np.mean(np.asarray(x, np.float64), axis=1))
        for x in (in_logits, out_logits))
    if in_logits.shape[1] > 1:
        scores["mutual_information"] = tuple(mutual_information_score(p)
                                             for p in probs)
    return scores


def routing_stats(model, images, batch_size=64):
    """Per-token routing of every MoE block over `images`.

    Returns {"num_examples": N, "layers": {block name: {...}}} where each
    block has "expert_load" [E] (fraction of the token copies of the
    expert's member dispatched to it; sums to K per member without drops),
    "expert_member" [E], "dropped_fraction" (token copies dispatched to no
    expert), "num_token_copies", and, as numpy arrays for the plots,
    "top_expert" [N, M, T] (the dispatched expert with the largest gate,
    -1 when dropped) and "dropped" [N, M, T]. Batches of `batch_size`
    images are routed as `predict` routes them (same routing groups).
    """
    from keras import ops

    backbone = model.backbone
    m = backbone.ensemble_size
    tokens = backbone.embedding.num_tokens
    num_experts = backbone.num_experts
    per_member = num_experts // m
    top, counts = {}, {}
    n = images.shape[0]
    route = _router_outputs(backbone)
    for start in range(0, n, int(batch_size)):
        batch = images[start:start + int(batch_size)]
        b = batch.shape[0]
        for name, (mask, gates) in route(batch).items():
            mask = np.asarray(ops.convert_to_numpy(mask))
            gates = np.asarray(ops.convert_to_numpy(gates), np.float64)
            # Groups [G, S, E(, C)] hold the tokens in [B, T, M] order.
            served = mask.reshape(-1, mask.shape[2], mask.shape[3]).any(-1)
            served = served[:b * tokens * m].reshape(b, tokens, m, -1)
            gates = gates.reshape(-1, gates.shape[-1])[:b * tokens * m]
            gates = gates.reshape(b, tokens, m, -1)
            served = np.transpose(served, (0, 2, 1, 3))  # [B, M, T, E]
            gates = np.transpose(gates, (0, 2, 1, 3))
            best = np.argmax(np.where(served, gates, -np.inf), axis=-1)
            best = np.where(served.any(-1), best, -1)
            top.setdefault(name, []).append(best)
            counts.setdefault(name, np.zeros(num_experts, np.int64))
            counts[name] += served.sum(axis=(0, 1, 2))
    layers = {}
    copies_per_member = n * tokens
    for name in top:
        best = np.concatenate(top[name])
        dropped = best < 0
        layers[name] = {
            "expert_load": (counts[name] / copies_per_member).tolist(),
            "expert_member": [e // per_member for e in range(num_experts)],
            "dropped_fraction": float(np.mean(dropped)),
            "num_token_copies": int(n * tokens * m),
            "top_expert": best, "dropped": dropped}
    return {"num_examples": int(n), "layers": layers}


def _router_outputs(backbone):
    """A function: images -> {block name: (dispatch_mask, gates)}; jitted
    on JAX (eager JAX compiles every op of every new shape)."""
    import keras

    def route(images):
        with _no_grad():
            out = backbone.compute_intermediates(images)
        return {key.split("/", 1)[1]: (r["dispatch_mask"], r["gates"])
                for key, r in out.items() if key.startswith("routing/")}

    if keras.backend.backend() != "jax":
        return route
    import jax

    variables = backbone.variables
    routers = [block.mlp.router for block in backbone.moe_blocks]

    def stateless(values, images):
        with keras.StatelessScope(state_mapping=list(zip(variables,
                                                         values))):
            return route(images)

    jitted = jax.jit(stateless)

    def run(images):
        latest = [r.latest_metrics for r in routers]
        try:
            return jitted([v.value for v in variables], images)
        finally:  # no tracers left behind in the routers
            for r, metrics in zip(routers, latest):
                r.latest_metrics = metrics

    return run


def _no_grad():
    import contextlib

    import keras

    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def _make_plots(model, images, labels, logits, ood_logits, routing, metrics,
                out_dir, num_bins):
    from keras_e3 import plots as plotting
    from keras_e3.metrics import softmax

    made, skipped = {}, {}

    def path(key):
        made[key] = PLOT_FILES[key]
        return os.path.join(out_dir, PLOT_FILES[key])

    member_probs = softmax(logits)
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
        preprocessor = getattr(model, "preprocessor_config", None) or {}
        plotting.routing_maps(
            images[:count],
            {k: v["top_expert"][:count, :, emb.num_prefix_tokens:]
             for k, v in routing["layers"].items()},
            emb.grid_size, backbone.num_experts, backbone.ensemble_size,
            path("routing_maps"), labels=labels[:count],
            value_range=preprocessor.get("value_range"))
        plotting.expert_load(
            routing["layers"], backbone.num_selected_experts,
            backbone.ensemble_size, path("expert_load"),
            num_examples=routing["num_examples"])
    if ood_logits is not None:
        plotting.ood_histograms(ood_scores(logits, ood_logits),
                                path("ood_scores"))
    else:
        skipped["ood_scores"] = "no OOD data"
    return made, skipped


def summary(report):
    """A few human-readable lines about a report."""
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
        lines.append(f"  {name}: expert load [{load}], "
                     f"dropped {r['dropped_fraction']:.2%}")
    for key, reason in (report.get("skipped_plots") or {}).items():
        lines.append(f"  plot {key} skipped: {reason}")
    return "\n".join(lines)
