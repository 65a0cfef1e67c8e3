"""Keep the memory a compiled CPU step frees for the next step.

XLA on the CPU allocates each call's scratch memory (the activations a
training step keeps for its backward pass: 0.77 GB for the ViT S/32 step
at batch 32) with `malloc` and frees it when the call returns. glibc's
`malloc` serves blocks that large with `mmap` and gives them back to the
kernel on `free`, so every step touches fresh pages: about 190,000 page
faults and 0.45 s of kernel time per step on a 2-core machine, a quarter
of the step's CPU time (PERFORMANCE.md, "Where a CPU training step's time
goes"). `retain_cpu_memory` sets glibc's `malloc` to serve large blocks
from its heap (no `mmap`), to keep what is freed (no trimming), and to use
one arena for all threads (a block freed by one thread is reused by
another): the next step finds its pages mapped already.

The cost: the process keeps its peak memory until it exits (freed memory
goes back to `malloc`, not to the system), and threads that allocate at
the same time share one arena. A process-wide setting, hence a function
to call (the `keras-e3 finetune` command calls it) and not something
importing keras-e3 does.
"""

import ctypes
import ctypes.util
import sys
import warnings

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# The largest trim threshold mallopt takes (an int): 2 GiB - 1 of free
# memory at the top of the heap before glibc gives any back.
MAX_TRIM_THRESHOLD = 2**31 - 1

_applied = False


def _jax_started():
    """Whether JAX's backends (and their thread pools, each with its own
    malloc arena) exist already; False if JAX is not loaded."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - a JAX without that module
        return False
    return bool(getattr(xla_bridge, "_backends", None))


def retain_cpu_memory():
    """Makes glibc's `malloc` keep freed memory for reuse, so that a
    compiled CPU step does not fault its scratch memory in again at every
    call.

    Call it at the start of a CPU training script, before the first
    computation: on JAX before anything runs (its thread pools take their
    malloc arenas when they start). Measured on JAX, ViT S/32, batch 32,
    2 cores: 1.75 s -> 1.41 s a training step, page faults 189,000 -> 0
    a step (PERFORMANCE.md); inference steps, whose scratch memory is
    small, gain nothing measurable. Other backends: not measured.

    Returns:
        True if the settings are in effect (also on a second call); False,
        with a warning saying why, where they cannot be: not glibc (macOS,
        Windows, musl), or JAX's backend already started (the call would
        change nothing for its threads).

    Example:
    ```python
    import subprocess, sys
    # The first lines of a training script, here run as their own process
    # (the setting is process-wide).
    script = ("from keras_e3.training import retain_cpu_memory; "
              "print(retain_cpu_memory())")
    done = subprocess.run([sys.executable, "-c", script],
                          capture_output=True, text=True)
    done.stdout.strip()  # 'True' on Linux with glibc
    ```
    """
    global _applied
    if _applied:
        return True
    if _jax_started():
        warnings.warn(
            "retain_cpu_memory: JAX's backend has started already; its "
            "threads keep their malloc arenas and the setting would not "
            "reach them. Call it before the first computation.",
            stacklevel=2)
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # only glibc has it
    except (OSError, AttributeError, TypeError):
        warnings.warn(
            f"retain_cpu_memory: the C library ({name}) is not glibc; "
            "nothing was changed.", stacklevel=2)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = (mallopt(M_MMAP_MAX, 0) and mallopt(M_ARENA_MAX, 1)
          and mallopt(M_TRIM_THRESHOLD, MAX_TRIM_THRESHOLD))
    if not ok:  # pragma: no cover - glibc accepts all three
        warnings.warn("retain_cpu_memory: glibc refused a malloc setting.",
                      stacklevel=2)
        return False
    _applied = True
    return True
