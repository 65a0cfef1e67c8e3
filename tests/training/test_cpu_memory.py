"""`retain_cpu_memory`: glibc's malloc keeps a compiled CPU step's freed
scratch memory. The oracle is the kernel's own count of page faults
(`getrusage`): a jitted JAX function with tens of MB of scratch memory faults
it in at every call by default, and not at all once the setting is on.
Each case runs in its own process, since the setting is process-wide."""

import os
import subprocess
import sys
import warnings

import pytest

from keras_e3.training import cpu_memory

pytestmark = [
    pytest.mark.single_backend,
    pytest.mark.skipif(not sys.platform.startswith("linux"),
                       reason="glibc's malloc"),
]

SCRIPT = """
import os, resource, sys, warnings
os.environ["KERAS_BACKEND"] = "jax"
from keras_e3.training import retain_cpu_memory
mode = sys.argv[1]
if mode == "early":
    print("applied", retain_cpu_memory(), retain_cpu_memory())
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.tanh(jnp.tanh(x @ x.T) @ x)))
x = jnp.ones((4096, 1024))   # x @ x.T: [4096, 4096], 64 MB
f(x).block_until_ready()
if mode == "late":
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        print("applied", retain_cpu_memory())
    print("warned", "started already" in str(caught[0].message))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    f(x).block_until_ready()
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print("faults_per_call", (after - before) / 4)
"""


def _run(mode):
    env = dict(os.environ, KERAS_BACKEND="jax")
    env.pop("GLIBC_TUNABLES", None)
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    return lines


def test_retained_memory_is_not_faulted_in_again():
    default = _run("default")
    retained = _run("early")
    # Thousands of 4 KiB pages of scratch memory faulted in at every call
    # (about 5,000-7,000 here), none once retained.
    assert float(default["faults_per_call"]) > 2000
    assert retained["applied"] == "True True"  # a second call: True too
    assert float(retained["faults_per_call"]) < 100


def test_after_jax_started_it_warns_and_changes_nothing():
    late = _run("late")
    assert late["applied"] == "False"
    assert late["warned"] == "True"
    assert float(late["faults_per_call"]) > 2000


def test_not_glibc_warns_and_changes_nothing(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_applied", False)
    monkeypatch.setattr(cpu_memory, "_jax_started", lambda: False)
    monkeypatch.setattr(cpu_memory.ctypes.util, "find_library",
                        lambda name: "libnot-a-c-library.so.0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cpu_memory.retain_cpu_memory() is False
    assert "is not glibc" in str(caught[0].message)
    assert cpu_memory._applied is False
