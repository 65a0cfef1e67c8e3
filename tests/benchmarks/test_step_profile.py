"""benchmarks/step_profile.py: the exclusive op times, the op_name
components of both sides' module names, the commands and the JSON it
writes (no profiling, no official code: hand-made events and HLO)."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..",
                                "benchmarks"))
import step_profile as sp  # noqa: E402

pytestmark = pytest.mark.single_backend

HLO = """
ENTRY %main.1 (p: f32[4]) -> f32[4] {
  %ynn_fusion.3 = f32[8,8]{1,0} fusion(%a, %b), kind=kCustom, calls=%f.3, metadata={op_name="jit(train_step)/jvp(e3_vi_t_backbone)/encoderblock_2/mlp/dense_0/dot_general" stack_frame_id=3}
  %cond.7 = (f32[8]) conditional(%p), metadata={op_name="jit(train_step)/transpose(jvp(e3_vi_t_backbone))/encoderblock_5/moe/cond" stack_frame_id=9}
  %multiply_subtract_fusion.2 = f32[8] fusion(%a), kind=kLoop, metadata={op_name="jit(train_step)/sgd/sub" stack_frame_id=4}
  %copy.5 = f32[8] copy(%state)
}
"""


def test_exclusive_times_subtract_nested_events():
    # A 10 ms conditional holding two ops of 3 and 4 ms, then a 2 ms op.
    events = [(0, 10, "cond.7"), (1, 3, "ynn_fusion.3"),
              (5, 4, "multiply"), (12, 2, "copy.5")]
    assert sp.exclusive_times(events) == {0: 3, 1: 3, 2: 4, 3: 2}
    # Order in the list does not matter.
    assert sp.exclusive_times(events[::-1]) == {3: 3, 2: 3, 1: 4, 0: 2}


def test_op_names_of_an_optimised_module():
    names = sp.op_names(HLO)
    assert names["ynn_fusion.3"].endswith("mlp/dense_0/dot_general")
    assert names["multiply_subtract_fusion.2"] == "jit(train_step)/sgd/sub"
    assert "copy.5" not in names


@pytest.mark.parametrize("op_name, expected", [
    # ours
    ("jit(train_step)/jvp(e3_vi_t_backbone)/encoderblock_0/attention/"
     "query/abc,cde->abde/dot_general", ("attention projections", "forward")),
    ("jit(train_step)/transpose(jvp(e3_vi_t_backbone))/encoderblock_0/"
     "attention/btnh,bsnh->bnts/dot_general", ("attention core", "backward")),
    ("jit(train_step)/transpose(jvp(e3_vi_t_backbone))/encoderblock_3/"
     "norm_1/reduce_sum", ("layer norms", "backward")),
    ("jit(predict_step)/e3_vi_t_backbone/encoderblock_5/moe/cond/"
     "branch_10_fun/dot_general", ("MoE layers", "forward")),
    ("jit(train_step)/jvp(e3_vi_t_backbone)/embedding/transpose",
     ("embedding", "forward")),
    ("jit(train_step)/sgd/sub", ("parameter update", "forward")),
    ("jit(train_step)/jvp(head)/dot_general", ("head and loss", "forward")),
    ("jit(train_step)/jvp(e3_vi_t_backbone)/encoderblock_1/add",
     ("other encoder ops", "forward")),
    # the official code's
    ("jit(step)/transpose(jvp(VisionTransformerMoe))/Encoder/"
     "encoderblock_1/SelfAttention/out/dot_general",
     ("attention projections", "backward")),
    ("jit(step)/jvp(VisionTransformerMoe)/Encoder/encoderblock_1/"
     "SelfAttention/...qhd,...khd->...hqk/dot_general",
     ("attention core", "forward")),
    ("jit(step)/jvp(VisionTransformerMoe)/Encoder/encoderblock_1/Mlp/"
     "Mlp/dot_general", ("dense MLP", "forward")),
    ("jit(step)/jvp(VisionTransformerMoeEnsemble)/Encoder/encoderblock_5/"
     "Moe/Moe/dot_general", ("MoE layers", "forward")),
    ("jit(step)/jvp(VisionTransformerMoe)/Encoder/encoderblock_0/"
     "LayerNorm_0/mul", ("layer norms", "forward")),
    ("jit(step)/jvp(VisionTransformerMoe)/embedding/conv_general_dilated",
     ("embedding", "forward")),
    ("jit(step)/jvp(VisionTransformerMoe)/concatenate",
     ("embedding", "forward")),
    ("jit(step)/sub", ("parameter update", "forward")),
    ("jit(step)/jvp(log_softmax)/reduce_max", ("head and loss", "forward")),
    ("", ("unnamed", "forward")),
])
def test_components_of_both_sides_names(op_name, expected):
    assert sp.classify(op_name) == expected


def test_aggregate_per_op_and_component():
    # Two calls on two threads; times in ns.
    threads = {
        "a": [(0, 10_000_000, "cond.7"), (1_000_000, 4_000_000,
                                          "ynn_fusion.3"),
              (20_000_000, 2_000_000, "ThunkExecutor::Execute")],
        "b": [(0, 6_000_000, "multiply_subtract_fusion.2"),
              (7_000_000, 2_000_000, "copy.5"),
              (9_000_000, 1_000_000, "H2D Dispatch")],
    }
    result = sp.aggregate(threads, HLO, calls=2)
    # (cond 10 - 4 nested, 4, 6, 2, 1) / 2 calls; no bookkeeping event.
    assert result["op_ms"] == 9.5
    assert result["components"] == {
        "MoE layers (backward)": 3.0, "parameter update (forward)": 3.0,
        "dense MLP (forward)": 2.0, "unnamed (forward)": 1.0,
        "input transfer (forward)": 0.5}
    top = {r["op"]: r for r in result["top_ops"]}
    assert top["cond.7"]["ms"] == 3.0 and top["copy.5"]["op_name"] == ""


def test_arguments_and_commands():
    args = sp.parse_args([])
    assert (args.models, args.modes) == (["dense", "vmoe", "eee"],
                                         ["train", "infer"])
    assert (args.batch, args.calls, args.allocator) == (32, 3, "default")
    with pytest.raises(SystemExit):
        sp.parse_args(["--calls", "0"])
    args = sp.parse_args(["--vmoe-env", "/x/env.sh", "--tools", "/t",
                          "--params", "/p", "--allocator", "retain"])
    ours = sp.side_command(args, "ours", "eee", "infer", "/d", "/tr")
    assert ours[:2] == ["env", "GLIBC_TUNABLES=glibc.malloc.mmap_max=0:"
                        "glibc.malloc.arena_max=1:"
                        "glibc.malloc.trim_threshold=2147483647"]
    assert ours[2] == sys.executable and ours[4:] == [
        "--side", "ours", "eee", "infer", "32", "3", "/p", "/d", "/tr",
        "retain"]
    official = sp.side_command(args, "official", "vmoe", "train", "/d",
                               "/tr")[2]
    assert official.startswith("export GLIBC_TUNABLES=glibc.malloc."
                               "mmap_max=0:")
    assert "source '/x/env.sh' && exec python" in official
    assert official.endswith("--side official 'vmoe' 'train' '32' '3' "
                             "'/t' '/d' '/tr' 'retain'")
    args.allocator = "default"
    assert sp.side_command(args, "ours", "eee", "infer", "/d",
                           "/tr")[0] == sys.executable
    assert "GLIBC_TUNABLES" not in sp.side_command(
        args, "official", "vmoe", "train", "/d", "/tr")[2]


def test_without_official_env_or_params_writes_what_it_has(tmp_path,
                                                           monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("no process may run")

    monkeypatch.setattr(sp, "run_side", never)
    out = tmp_path / "out.json"
    sp.main(["--vmoe-env", str(tmp_path / "absent.sh"),
             "--params", str(tmp_path / "absent"), "--out", str(out)])
    result = json.loads(out.read_text())
    assert "absent.sh not found" in result["run"]["official_skipped"]
    assert result["run"]["missing_params"] == ["dense", "vmoe", "eee"]
    assert result["rows"] == []


def test_the_module_that_ran_is_the_one_defining_the_profiled_ops(tmp_path):
    (tmp_path / "module_0001.jit__lambda.cpu_after_optimizations.txt"
     ).write_text("ENTRY %init {\n  %copy.5 = f32[8] copy(%p)\n"
                  + "  %rng.1 = f32[8] rng(%p)\n" * 50 + "}\n")
    (tmp_path / "module_0002.jit_step.cpu_after_optimizations.txt"
     ).write_text(HLO)
    (tmp_path / "module_0002.jit_step.cpu_after_optimizations"
     "-buffer-assignment.txt").write_text(HLO * 3)
    threads = {"a": [(0, 1, "ynn_fusion.3"), (2, 1, "cond.7")],
               "b": [(0, 1, "copy.5"), (3, 1, "H2D Dispatch")]}
    text, name = sp.ran_module(str(tmp_path), threads)
    assert name == "module_0002.jit_step.cpu_after_optimizations.txt"
    assert text == HLO
