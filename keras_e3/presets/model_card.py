"""A README.md model card for a preset (`huggingface_hub.ModelCard`, with its
metadata header): what it is, how well it does, how to load it, and what
to cite."""

import json
import os

from huggingface_hub import ModelCard
from huggingface_hub import ModelCardData

from keras_e3.layers.embedding import as_pair
from keras_e3.presets import files as preset_io

CITATION = """@article{allingham2022sparse,
  title   = {Sparse MoEs meet Efficient Ensembles},
  author  = {Allingham, James Urquhart and Wenzel, Florian and Mariet, Zelda E
             and Mustafa, Basil and Puigcerver, Joan and Houlsby, Neil and
             Jerfel, Ghassen and Fortuin, Vincent and Lakshminarayanan, Balaji
             and Snoek, Jasper and Tran, Dustin and Riquelme Ruiz, Carlos and
             Jenatton, Rodolphe},
  journal = {Transactions on Machine Learning Research},
  year    = {2022}
}"""


def _family(config):
    if not config.get("num_experts"):
        return "ViT (dense)"
    if config.get("ensemble_size", 1) > 1:
        return "E³ (Efficient Ensemble of Experts)"
    return "V-MoE (sparse Mixture of Experts)"


def _table(rows):
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def model_card(preset_dir, repo_id, metadata=None):
    """The card's Markdown text for the preset at `preset_dir`."""
    metadata = metadata or preset_io.read_json(preset_dir,
                                               preset_io.METADATA_FILE)
    config = preset_io.read_json(preset_dir, preset_io.CONFIG_FILE)["config"]
    task_file = os.path.join(preset_dir, preset_io.TASK_CONFIG_FILE)
    num_classes = None
    if os.path.isfile(task_file):
        num_classes = preset_io.read_json(
            preset_dir, preset_io.TASK_CONFIG_FILE)["config"]["num_classes"]
    family = _family(config)
    arch = [
        ("family", family),
        ("image size", "×".join(
            map(str, as_pair(config["image_size"], "image_size")))),
        ("patch size", "×".join(
            map(str, as_pair(config["patch_size"], "patch_size")))),
        ("layers / width / heads / MLP",
         f"{config['num_layers']} / {config['hidden_dim']} / "
         f"{config['num_heads']} / {config['mlp_dim']}"),
        ("parameters", f"{metadata.get('parameter_count', '?'):,}"
         if isinstance(metadata.get("parameter_count"), int) else "?"),
    ]
    if config.get("num_experts"):
        arch += [("experts (E) / selected (K)",
                  f"{config['num_experts']} / "
                  f"{config['num_selected_experts']}"),
                 ("MoE layers", ", ".join(map(str, config["moe_layers"]))),
                 ("ensemble members (M)", config.get("ensemble_size", 1)),
                 ("capacity factor", config["capacity_factor"])]
    if num_classes is not None:
        arch.append(("classes", num_classes))
    metrics = metadata.get("metrics")
    metrics_text = ("```json\n" + json.dumps(metrics, indent=2,
                                             sort_keys=True) + "\n```"
                    if metrics else "No evaluation results were recorded "
                    "with this preset.")
    source = metadata.get("source") or metadata.get("dataset") or "—"
    data = ModelCardData(
        library_name="keras-e3", license="apache-2.0",
        pipeline_tag="image-classification",
        tags=["keras", "image-classification", "mixture-of-experts",
              "ensembles"])
    body = f"""# {repo_id}

A keras-e3 preset: a {family} image classifier for Keras 3 (JAX, TensorFlow
or PyTorch).

```python
import keras_e3

model = keras_e3.E3ViT.from_preset("hf://{repo_id}")
member_logits = model.predict_members(images)  # [B, M, C] (M = 1 unless E³)
log_probs = model.predict_ensemble(images)     # log(mean_m softmax(logits_m))
```

`images`: raw images (file paths, encoded bytes, uint8 arrays of any size,
a `tf.data` pipeline of them), turned into model inputs by the preset's
`keras_e3.ImageConverter` (`preprocessor.json`, `model.preprocessor`).

## Architecture

{_table(arch)}

## Evaluation

{metrics_text}

Source: {source}

## Intended use and limitations

Image classification and transfer (fine-tuning or few-shot linear probes),
and research on sparse Mixture-of-Experts and efficient ensembles. The
model's predictions reflect its training data; check accuracy and
calibration on your own data before relying on them. Every file is listed
with its sha256 in `metadata.json` and verified when loaded.

## Citation

```bibtex
{CITATION}
```
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))

