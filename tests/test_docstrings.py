"""Every exported class and function has a keras-hub style docstring
(`Args:` where it takes arguments, and an `Example:` with a ```python
block), and every such example runs.

"Exported": the classes and functions that `keras_e3/__init__.py` and the
sub-packages' `__init__.py` (`keras_e3.layers`, `data`, `distribution`,
`evaluation`, `export`, `metrics`, `models`, `preprocessing`, `presets`,
`training`) import, defined in keras_e3 (modules and constants are left
out).

The examples run in this process on the first backend of
`run_backends.py` only (`single_backend`; they are written for every
backend), except an example with a line `# Backend: NAME` (JAX's
`keras.distribution`, TensorFlow's export), which runs on that backend
only. Each runs in an empty working directory, without the network
(HF_HUB_OFFLINE=1; tensorflow-datasets through `tfds.testing.mock_data`),
under an alarm of `EXAMPLE_TIMEOUT` seconds so that a stuck example fails
instead of hanging CI. Keep them tiny: the shipped presets or tiny
configs.
"""

import importlib
import inspect
import re
import signal
import textwrap

import keras
import pytest

PACKAGES = ("keras_e3", "keras_e3.layers", "keras_e3.data",
            "keras_e3.distribution", "keras_e3.evaluation",
            "keras_e3.export", "keras_e3.metrics", "keras_e3.models",
            "keras_e3.preprocessing", "keras_e3.presets",
            "keras_e3.training")
EXAMPLE_TIMEOUT = 120
# Exported symbols whose files other contributors own and have not
# documented in this form yet (issue 31, item 5): xfail (not strict, so
# that each one passes as soon as it is documented). Keep it short.
UNDOCUMENTED = set()
EXAMPLE = re.compile(r"^\s*Examples?:\s*$", re.MULTILINE)
CODE = re.compile(r"```python\n(.*?)```", re.DOTALL)
BACKEND_LINE = re.compile(r"^# Backend: (jax|tensorflow|torch)$", re.MULTILINE)


def exported():
    """{"module.qualname": object} of every exported class and function."""
    out = {}
    for package in PACKAGES:
        for name, obj in vars(importlib.import_module(package)).items():
            # Decorated functions (functools.lru_cache) count too.
            if name.startswith("_") or not (
                    inspect.isclass(obj) or inspect.isfunction(obj)
                    or inspect.isfunction(getattr(obj, "__wrapped__", None))):
                continue
            module = getattr(obj, "__module__", "") or ""
            if module.split(".")[0] == "keras_e3":
                out[f"{module}.{obj.__qualname__}"] = obj
    return out


SYMBOLS = exported()


def takes_arguments(obj):
    """Whether `obj` (its constructor, for a class) has named parameters."""
    target = obj
    if inspect.isclass(obj):
        init = obj.__init__
        if not (getattr(init, "__module__", "") or "").startswith(
                "keras_e3") and not hasattr(obj, "__dataclass_fields__"):
            return False
        target = obj
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name != "self" and p.kind not in (p.VAR_POSITIONAL,
                                                   p.VAR_KEYWORD)
               for p in params)


def examples(doc):
    """The ```python blocks after the docstring's `Example:` heading."""
    match = EXAMPLE.search(doc)
    if not match:
        return []
    return [textwrap.dedent(code) for code in CODE.findall(doc[match.end():])]


def params(names):
    return [pytest.param(name, marks=pytest.mark.xfail(
        reason="not documented yet by its file's owner", strict=False))
        if name in UNDOCUMENTED else name for name in names]


@pytest.mark.single_backend
def test_the_exception_list_is_current():
    assert UNDOCUMENTED <= set(SYMBOLS), sorted(UNDOCUMENTED - set(SYMBOLS))


@pytest.mark.single_backend
@pytest.mark.parametrize("name", params(sorted(SYMBOLS)))
def test_docstring(name):
    obj = SYMBOLS[name]
    doc = inspect.getdoc(obj) or ""
    assert doc, f"{name} has no docstring"
    if takes_arguments(obj):
        assert re.search(r"^\s*Args:\s*$", doc, re.MULTILINE), \
            f"{name}: no Args: section"
    assert examples(doc), f"{name}: no Example: with a ```python block"


def example_backend(code):
    """The backend an example names in a `# Backend: NAME` line, or None
    (any backend)."""
    match = BACKEND_LINE.search(code)
    return match.group(1) if match else None


def _example_cases():
    """An example that names its backend runs on that backend only (the
    test is then not `single_backend`: `run_backends.py` runs it there;
    elsewhere it is not collected); the others run once, on the first
    backend."""
    cases = []
    for name in sorted(SYMBOLS):
        for i, code in enumerate(examples(inspect.getdoc(SYMBOLS[name])
                                          or "")):
            backend = example_backend(code)
            if backend not in (None, keras.backend.backend()):
                continue  # not collected: a run that selects nothing else
                # (run_backends.py on a later backend) stays valid
            marks = [pytest.mark.single_backend] if backend is None else []
            if name in UNDOCUMENTED:
                marks.append(pytest.mark.xfail(
                    reason="not documented yet by its file's owner",
                    strict=False))
            cases.append(pytest.param(name, code, id=f"{name}-{i}",
                                      marks=marks))
    return cases


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout(f"example ran over {EXAMPLE_TIMEOUT} s")


@pytest.mark.parametrize("name,code", _example_cases())
def test_example_runs(name, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    policy = keras.config.dtype_policy()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(EXAMPLE_TIMEOUT)
    try:
        exec(compile(code, f"<example of {name}>", "exec"),
             {"__name__": "__example__"})
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        keras.config.set_dtype_policy(policy)
