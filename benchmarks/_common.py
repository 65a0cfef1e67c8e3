"""Helpers shared by the benchmark scripts: timing, the matmul peak,
compiled calls per backend (with JAX's compiled memory analysis), run
metadata and JSON output.

Timing rule: a warm-up call (compilation, first allocations) is never
timed; the result is the median of `repeats` further calls, each waiting
until its result is ready. Calls compared with each other are timed
interleaved (`timed_interleaved`).

Keras is imported only where needed, so that run_all.py and report.py
(which only read and write JSON) start without a backend.
"""

import importlib.util
import json
import os
import platform
import statistics
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATMUL_SIZE = 2048


def write_json_atomic(path, data):
    """`keras_e3.io_utils.write_json_atomic`, loaded from its file: the
    `keras_e3` package itself imports Keras."""
    spec = importlib.util.spec_from_file_location(
        "_keras_e3_io_utils", os.path.join(ROOT, "keras_e3", "io_utils.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_json_atomic(path, data)


def backend():
    import keras

    return keras.backend.backend()


def timed(run, repeats, warmup=1):
    """(median seconds of `repeats` calls of run(), seconds of the first
    warm-up call)."""
    return timed_interleaved({0: run}, repeats, warmup)[0]


def timed_interleaved(runs, repeats, warmup=1, stat=statistics.median):
    """{key: (median (`stat`) seconds of `repeats` calls of runs[key](),
    seconds of its warm-up calls)}. After the warm-ups, the calls are
    timed round robin (a, b, a, b, ...), so that a drift in the machine's
    speed during the measurement shifts every call alike instead of
    biasing their ratio."""
    first = {}
    for key, run in runs.items():
        start = time.perf_counter()
        for _ in range(warmup):
            run()
        first[key] = time.perf_counter() - start
    times = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    return {key: (stat(times[key]), first[key]) for key in runs}


def block(tree):
    """Waits until every array in `tree` is computed: JAX dispatches
    asynchronously; TensorFlow's tensors are read back (as the original
    benchmark did); PyTorch on CPU returns finished tensors, on a GPU its
    stream is synchronised."""
    name = backend()
    if name == "jax":
        import jax

        return jax.block_until_ready(tree)
    if name == "tensorflow":
        import tensorflow as tf

        return tf.nest.map_structure(lambda t: t.numpy(), tree)
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return tree


def device():
    """{"platform": "cpu" / "gpu" / "tpu", "kind": the device's name} of
    the device this backend computes on: JAX's first device, TensorFlow's
    first GPU if it sees one, PyTorch's CUDA device if available (Keras
    places tensors there), else the CPU."""
    name = backend()
    if name == "jax":
        import jax

        first = jax.devices()[0]
        return dict(platform=first.platform, kind=first.device_kind)
    if name == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            return dict(platform="gpu",
                        kind=details.get("device_name", gpus[0].name))
    else:
        import torch

        if torch.cuda.is_available():
            return dict(platform="gpu",
                        kind=torch.cuda.get_device_name(0))
    return dict(platform="cpu", kind=platform.processor() or
                platform.machine())


def memory_fields(compiled):
    """Bytes of a compiled JAX executable (`memory_analysis()`): temp,
    argument, output, alias (outputs reusing donated arguments) and
    peak = temp + argument + output - alias. Deterministic: no load or
    allocator effects."""
    stats = compiled.memory_analysis()
    fields = {name: int(getattr(stats, f"{name}_size_in_bytes", 0) or 0)
              for name in ("temp", "argument", "output", "alias")}
    fields["peak"] = (fields["temp"] + fields["argument"] + fields["output"]
                      - fields["alias"])
    return fields


def compile_call(fn, *args, donate_argnums=()):
    """fn compiled for this backend, and its memory on JAX.

    Returns (call, memory): call(*args) runs the compiled function
    (JAX: ahead-of-time `jit(fn).lower(*args).compile()`, reused for
    timing; TensorFlow: `tf.function(jit_compile=True)`, XLA; PyTorch:
    eager under `torch.no_grad()`); memory is `memory_fields` on JAX and
    None elsewhere (not measured).
    """
    name = backend()
    if name == "jax":
        import jax

        compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(
            *args).compile()
        return compiled, memory_fields(compiled)
    if name == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True), None
    import torch

    def call(*call_args):
        with torch.no_grad():
            return fn(*call_args)

    return call, None


def matmul_peak(repeats=5, dtype="float32", size=None):
    """GFLOP/s of a compiled `dtype` size^3 matmul (default 2048; 8192 on
    a GPU, which a 2048 product does not fill) on this backend's device
    (PyTorch: eager), the reference for the useful-FLOP rates: median of
    `repeats` calls after a warm-up."""
    import keras

    n = size or (4 * MATMUL_SIZE if device()["platform"] != "cpu"
                 else MATMUL_SIZE)
    a = keras.random.normal((n, n), dtype=dtype)
    b = keras.random.normal((n, n), dtype=dtype)
    call, _ = compile_call(lambda x, y: x @ y, a, b)
    seconds, _ = timed(lambda: block(call(a, b)), repeats)
    return 2 * n ** 3 / seconds / 1e9


def run_info(**extra):
    """Backend, library versions and machine of this run."""
    import keras

    name = backend()
    module = {"jax": "jax", "tensorflow": "tensorflow",
              "torch": "torch"}.get(name)
    version = None
    if module:
        version = getattr(__import__(module), "__version__", None)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    found = device()
    return dict(backend=name, backend_version=version,
                keras=keras.version(), python=platform.python_version(),
                machine=platform.machine(), cpus=os.cpu_count(),
                device_platform=found["platform"], device_kind=found["kind"],
                dtype_policy=keras.config.dtype_policy().name,
                load_average_1min=load, **extra)


DTYPES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


def set_dtype(dtype):
    """Runs the models about to be built in `dtype`: "float32", or
    "bfloat16" (Keras' mixed_bfloat16 policy: bf16 computation, float32
    weights, as mixed-precision training runs on a GPU or TPU). Returns
    the matmul dtype of the peak to compare with."""
    import keras

    keras.config.set_dtype_policy(DTYPES[dtype])
    return dtype


def emit(result, out=None):
    """Prints `result` as JSON; with `out`, also writes it atomically."""
    print(json.dumps(result, indent=1), flush=True)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        write_json_atomic(out, result)


def emit_row(row):
    """One progress line per measured row (JSON), as it is measured."""
    print(json.dumps(row), flush=True)


def jax_models_args(argv, doc, script, models, default_models):
    """The arguments of a JAX-only benchmark over S/32 models and batches:
    --quick (batch 8, one repeat), --models, --batches (32 128),
    --repeats (7), --out; exits unless the backend is JAX."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: batch 8, one repeat")
    parser.add_argument("--models", nargs="+", default=list(default_models),
                        choices=list(models))
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.repeats = [8], 1
    if backend() != "jax":
        raise SystemExit(f"{script} runs on JAX (KERAS_BACKEND=jax)")
    return args
