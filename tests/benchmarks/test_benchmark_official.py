"""benchmarks/official_side_by_side.py: its arguments, the alternated runs
and the JSON it writes, on fake official and ours processes (no timing,
no official code), and the official side skipped when its environment is
absent."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..",
                                "benchmarks"))
import official_side_by_side as sbs  # noqa: E402


def fake(data):
    """argv of a process that prints `data` as JSON."""
    return [sys.executable, "-c", f"print({json.dumps(json.dumps(data))})"]


@pytest.mark.single_backend
def test_arguments():
    args = sbs.parse_args([])
    assert args.models == ["dense", "vmoe", "eee"]
    assert args.modes == ["infer", "train"]
    assert (args.batch, args.alternations) == (32, 3)
    assert args.out.endswith(os.path.join("benchmarks", "results",
                                          "official_side_by_side_jax.json"))
    with pytest.raises(SystemExit):
        sbs.parse_args(["--models", "vit"])
    with pytest.raises(SystemExit):
        sbs.parse_args(["--alternations", "0"])
    args = sbs.parse_args(["--models", "eee", "--modes", "train",
                           "--batch", "8", "--vmoe-env", "/x/env.sh",
                           "--tools", "/t", "--params", "/p"])
    official = sbs.official_command(args, "eee", "train")
    assert official[:2] == ["bash", "-c"]
    assert "source '/x/env.sh'" in official[2]
    assert "'/t/vmoe_bench.py' --models eee --batches 8 --repeats 5" \
        in official[2] and official[2].endswith(" --train")
    assert "--save-params '/p'" in sbs.official_command(
        args, "eee", "infer", save_params="/p")[2]
    assert sbs.ours_command(args, "eee", "infer") == [
        sys.executable, "/t/ours_bench.py", "/p/eee", "8"]


@pytest.mark.single_backend
def test_alternates_and_writes_each_sides_best(tmp_path, monkeypatch):
    (tmp_path / "env.sh").write_text("")
    (tmp_path / "vmoe_bench.py").write_text("")
    for kind in ("dense", "vmoe"):
        (tmp_path / "params" / kind).mkdir(parents=True)
        (tmp_path / "params" / kind / "params.npz").write_text("")
    official = iter([10.0, 12.0, 20.0, 16.0])
    ours = iter([11.0, 13.5, 30.0, 20.0])
    calls = []

    def official_command(args, kind, mode, save_params=None,
                         allocator="default"):
        assert allocator == "default"  # the argument's default
        calls.append(("official", kind, mode))
        value = next(official)
        return fake(dict(env={"jax": "x"}, results=[dict(
            img_per_s=value, median_s=round(args.batch / value, 4),
            gflops_per_img=1.5)]))

    def ours_command(args, kind, mode, allocator="default"):
        assert allocator == "default"
        calls.append(("ours", kind, mode))
        return fake(dict(img_per_s=next(ours)))

    monkeypatch.setattr(sbs, "official_command", official_command)
    monkeypatch.setattr(sbs, "ours_command", ours_command)
    out = tmp_path / "out.json"
    sbs.main(["--models", "dense", "vmoe", "--modes", "train",
              "--alternations", "2", "--tools", str(tmp_path),
              "--vmoe-env", str(tmp_path / "env.sh"),
              "--params", str(tmp_path / "params"), "--out", str(out)])
    assert calls == [("official", "dense", "train"), ("ours", "dense", "train"),
                     ("official", "dense", "train"), ("ours", "dense", "train"),
                     ("official", "vmoe", "train"), ("ours", "vmoe", "train"),
                     ("official", "vmoe", "train"), ("ours", "vmoe", "train")]
    result = json.loads(out.read_text())
    assert result["run"]["official_skipped"] is None
    assert result["run"]["alternations"] == 2
    dense, vmoe = result["rows"]
    assert (dense["official_img_per_s"], dense["ours_img_per_s"]) == (12, 13.5)
    assert dense["ratio"] == 1.125 and dense["target_met"]
    assert (vmoe["official_img_per_s"], vmoe["ours_img_per_s"]) == (20, 30)
    assert vmoe["ratio"] == 1.5 and vmoe["target"] == 1.1
    assert [r["img_per_s"] for r in dense["official_runs"]] == [10, 12]
    assert dense["allocator"] == "default"
    assert all("load_before" in r and "process_s" in r
               for r in dense["ours_runs"] + dense["official_runs"])


@pytest.mark.single_backend
def test_official_side_skipped_without_its_environment(tmp_path,
                                                       monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("no process may run")

    monkeypatch.setattr(sbs, "run_json", never)
    out = tmp_path / "out.json"
    sbs.main(["--vmoe-env", str(tmp_path / "absent.sh"),
              "--params", str(tmp_path / "absent"), "--out", str(out)])
    result = json.loads(out.read_text())
    assert "absent.sh not found" in result["run"]["official_skipped"]
    assert "no official parameters" in result["run"]["ours_skipped"]
    assert result["rows"] == []


@pytest.mark.single_backend
def test_retained_allocator_on_both_sides():
    """--allocators default retain: a set of rows each; under "retain" both
    processes get the same three glibc tunables."""
    args = sbs.parse_args(["--allocators", "default", "retain",
                           "--vmoe-env", "/x/env.sh", "--tools", "/t",
                           "--params", "/p"])
    assert args.allocators == ["default", "retain"]
    assert sbs.parse_args([]).allocators == ["default"]
    with pytest.raises(SystemExit):
        sbs.parse_args(["--allocators", "tcmalloc"])
    tunables = ("GLIBC_TUNABLES=glibc.malloc.mmap_max=0:"
                "glibc.malloc.arena_max=1:"
                "glibc.malloc.trim_threshold=2147483647")
    script = sbs.official_command(args, "vmoe", "train",
                                  allocator="retain")[2]
    assert script.startswith(f"export {tunables} && source '/x/env.sh'")
    assert "GLIBC_TUNABLES" not in sbs.official_command(args, "vmoe",
                                                        "train")[2]
    assert sbs.ours_command(args, "vmoe", "train", "retain") == [
        "env", tunables, sys.executable, "/t/ours_bench.py", "/p/vmoe",
        "32", "--train"]
