"""One cache-folder rule (`keras_e3.io_utils.cache_root`) for every cache:
official checkpoints, converted ViTs and built-in presets."""

import os

import pytest

from keras_e3.conversion import vmoe_checkpoint
from keras_e3.presets import builtin


@pytest.mark.single_backend
def test_every_cache_honours_keras_home(tmp_path, monkeypatch):
    monkeypatch.delenv("KERAS_E3_CACHE", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    expected = os.path.join(str(tmp_path / "kh"), "keras_e3")
    assert vmoe_checkpoint.cache_root() == expected
    assert str(builtin.cache_dir()) == expected


@pytest.mark.single_backend
def test_keras_e3_cache_wins_then_the_argument(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    monkeypatch.setenv("KERAS_E3_CACHE", str(tmp_path / "e3"))
    assert str(builtin.cache_dir()) == str(tmp_path / "e3")
    assert vmoe_checkpoint.cache_root() == str(tmp_path / "e3")
    assert vmoe_checkpoint.cache_root(tmp_path / "x") == str(tmp_path / "x")


@pytest.mark.single_backend
def test_default_is_under_the_home_folder(monkeypatch):
    monkeypatch.delenv("KERAS_E3_CACHE", raising=False)
    monkeypatch.delenv("KERAS_HOME", raising=False)
    expected = os.path.join(os.path.expanduser("~"), ".keras", "keras_e3")
    assert str(builtin.cache_dir()) == expected
