
from conftest import BACKEND
from conftest import run_cli


def test_demo_evaluates_the_shipped_e3_and_classifies_an_image(tmp_path):
    import keras
    import numpy as np

    from keras_e3.data.digits import load_digits_raw

    images, labels = load_digits_raw()
    image = tmp_path / "seven.png"
    seven = int(np.flatnonzero(labels == 7)[0])
    keras.utils.save_img(image, np.round(images[seven][..., None] * 255 / 16),
                         scale=False)
    result = run_cli("demo", "--image", str(image))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("e3_tiny_digits: E³ with 4 experts in 2 "
                               "partitions")
    assert f"backend {BACKEND}" in lines[0]
    assert lines[1].startswith("held-out digits: 450 images")
    rows = {line.split()[0] + (line.split()[1] if line.startswith("member")
                               else ""): line for line in lines[3:6]}
    assert set(rows) == {"ensemble", "member0", "member1"}
    accuracy = float(rows["ensemble"].split()[1])
    assert accuracy >= 0.95
    assert lines[6] == f"{image}:"
    # the preset's class names (its card's "digits" label set)
    assert lines[7].strip().startswith("member 0: ")
    assert lines[9].strip().startswith("ensemble: 7 ")


def test_demo_missing_image_is_a_clear_error():
    result = run_cli("demo", "--image", "no/such/file.png")
    assert result.returncode == 2
    assert "no such image file: no/such/file.png" in result.stderr
