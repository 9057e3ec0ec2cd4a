"""Lazy re-exports for a package ``__init__`` (PEP 562): ``from txfm.train import Trainer``
imports ``txfm.train.trainer`` (and torch) only then, so that reading the command line,
``--help`` and building a config stay light."""
from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """``(__getattr__, __dir__, __all__)`` for ``package`` whose public ``name`` lives in its
    submodule ``exports[name]``; each name is imported on first use and then cached."""
    names = sorted(exports)

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        mod = importlib.import_module(f"{package}.{module}")
        value = getattr(mod, name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__():
        return sorted(set(vars(importlib.import_module(package))) | set(names))

    return __getattr__, __dir__, names
