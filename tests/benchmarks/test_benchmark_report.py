"""benchmarks/report.py: the targets it computes from the benchmark JSONs
(pure Python on made-up results; no backend work)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..",
                                "benchmarks"))
import report  # noqa: E402


def backends_result(rows):
    return {"rows": [dict(model=model, batch=32, dispatcher=None,
                          jit_compile=True, predict_ms=ms,
                          images_per_s=32_000 / ms, peak_fraction=0.5,
                          **({} if vs is None else
                             {"throughput_vs_dense": vs}))
                     for model, ms, vs in rows]}


def status(table, target):
    for line in table.splitlines():
        if line.startswith(f"| {target}"):
            return line.rsplit("|", 2)[-2].strip()
    raise AssertionError(f"no target row {target!r}")


def test_backend_targets_read_the_backends_rows():
    backends = {
        "jax": backends_result([("vit_s32", 500.0, None),
                                ("e3_s32", 800.0, 0.625)]),
        "tensorflow": backends_result([("vit_s32", 520.0, None),
                                       ("e3_s32", 960.0, 0.54)]),
        "torch": backends_result([("vit_s32", 600.0, None),
                                  ("e3_s32", 1000.0, 0.6)])}
    assert report._predict_over_jax(backends) == 960.0 / 800.0
    assert report._e3_vs_dense_torch_over_jax(backends) == 0.6 / 0.625
    table = report.targets_table({}, {}, {}, backends)
    assert status(table, "E³ S/32 `predict_on_batch`") == "met"
    assert status(table, "… PyTorch's E³ ÷ dense") == "not met"
    backends["tensorflow"] = backends_result([("e3_s32", 1001.0, None)])
    table = report.targets_table({}, {}, {}, backends)
    assert status(table, "E³ S/32 `predict_on_batch`") == "not met"
    assert "PyTorch" in report.backends_predict_table(backends)


def test_share_gap_is_the_larger_gap_of_both_batches():
    def row(model, batch, share):
        return dict(model=model, batch=batch,
                    images_per_group=None if model == "vit_s32" else 8,
                    dispatcher="-" if model == "vit_s32" else "gather",
                    infer_peak_fraction=share)
    paths = {"jax": {"rows": [row("vit_s32", 32, 0.90),
                              row("e3_s32", 32, 0.70),
                              row("vit_s32", 128, 0.80),
                              row("e3_s32", 128, 0.81)]}}
    assert abs(report._share_gap(paths, {}) - 20.0) < 1e-9
    assert report._share_gap({}, {}) is None


def test_layouts_targets_read_each_runs_own_rows():
    def row(model, layout, batch, gap, run_batch=None):
        return dict(model=model, layout=layout, batch=batch,
                    run_batch=run_batch or batch, share_gap_points=gap)
    layouts = {"jax": {"rows": [
        row("vit_s32", "-", 32, 0.0), row("vit_s32", "-", 64, 4.0, 32),
        row("e3_s32", "buckets", 32, 2.5), row("e3_s32", "tiles", 32, 9.0),
        row("e3_s32_one_expert_per_member", "buffers", 32, 1.5),
        row("e3_s32", "buckets", 128, 2.0),
        row("e3_s32_one_expert_per_member", "buffers", 128, 0.5)]}}
    table = report.targets_table({}, {}, {}, {}, layouts)
    assert status(table, "E³ S/32 inference, JAX, groups of 8, on its "
                  "default layout") == "met"
    assert "2.5 points" in table and "1.5 points" in table
    assert status(table, "… the same for E³'s twin") == report.DASH
    layouts["jax"]["rows"].append(row("e3_s32", "buckets", 128, 3.5))
    table = report.targets_table({}, {}, {}, {}, layouts)
    assert status(table, "E³ S/32 inference, JAX, groups of 8, on its "
                  "default layout") == "not met"
    assert report.targets_table({}, {}, {}, {}, {}).count("not measured") \
        >= 2
