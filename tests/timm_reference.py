"""timm as the tests' reference, importable beside the CPU build of torch.

timm imports torchvision at import time (for data transforms and a frozen
batch norm that its ViTs never use), and PyPI's torchvision does not load
beside torch 2.13.0 CPU ("operator torchvision::nms does not exist"). When
the real torchvision cannot be imported, `import_timm` puts a stand-in on
the import path first: any `torchvision.*` module imports, and using one of
its names raises. timm's ViT code, the reference, is timm's own.
"""

import importlib.abc
import importlib.machinery
import sys
import types


class _Missing(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Missing(name, (), {})

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"torchvision stand-in: {cls.__name__} is not "
                           "available in the tests.")


class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Missing(name, (), {})


class _StandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self,
                                                  is_package=True)
        return None

    def create_module(self, spec):
        module = _Module(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def import_timm():
    """timm (pytest skips the test where timm or torch is not installed)."""
    import pytest

    pytest.importorskip("torch")
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or broken beside torch
        for name in [n for n in sys.modules if n == "torchvision"
                     or n.startswith("torchvision.")]:
            del sys.modules[name]
        if not any(isinstance(f, _StandIn) for f in sys.meta_path):
            sys.meta_path.insert(0, _StandIn())
    return pytest.importorskip("timm")
