"""benchmarks/expert_loop.py's smoke run (JAX): both programs compiled and
timed for each case, the JSON written, and the limit it varies restored."""

import json
import os
import sys

import keras
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..",
                                "benchmarks"))
import expert_loop  # noqa: E402

pytestmark = pytest.mark.skipif(keras.backend.backend() != "jax",
                                reason="a JAX benchmark")


def test_quick_run_writes_both_programs_per_case(tmp_path):
    from keras_e3.layers import expert_tiles

    out = tmp_path / "expert_loop.json"
    expert_loop.main(["--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["benchmark"] == "expert_loop"
    assert [(r["experts"], r["bound"]) for r in result["rows"]] == [
        (2, 16), (4, 24)]
    for row in result["rows"]:
        assert set(row["ms"]) == set(row["compile_s"]) == {"unrolled", "loop"}
        assert all(v > 0 for v in row["ms"].values())
        assert row["loop_over_unrolled"] == pytest.approx(
            row["ms"]["loop"] / row["ms"]["unrolled"], rel=0.02)
    assert result["unroll_up_to"] == expert_tiles.UNROLL_UP_TO == 8


def test_other_backends_are_refused(monkeypatch):
    monkeypatch.setattr(expert_loop, "backend", lambda: "torch")
    with pytest.raises(SystemExit, match="KERAS_BACKEND=jax"):
        expert_loop.main(["--quick"])
