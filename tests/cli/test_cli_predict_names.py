"""`keras-e3 predict` on PNG files: the preset's converter decodes them and
the classes are printed by name."""

import numpy as np

import keras_e3
from keras_e3.data.digits import load_digits_raw
from keras_e3.data.digits import to_uint8
from keras_e3.cli.predict import format_predictions
from keras_e3.cli.predict import predict


def test_predict_on_png_files_matches_arrays_and_prints_names(tmp_path):
    from PIL import Image

    images, labels = load_digits_raw()
    raw = to_uint8(images[:40])
    paths = []
    for i, image in enumerate(raw):
        path = tmp_path / f"digit_{i}.png"
        Image.fromarray(image, mode="L").save(path)
        paths.append(str(path))
    results = predict("e3_tiny_digits", paths, top_k=3)
    model = keras_e3.E3ViT.from_preset("e3_tiny_digits")
    expected = model.predict_ensemble(raw).argmax(-1)
    got = [int(r["top_k"][0]["class"]) for r in results]
    assert got == expected.tolist()
    assert np.mean(np.array(got) == labels[:40]) >= 0.9
    text = format_predictions(results)
    assert f"digit_0.png: {labels[0]} " in text
