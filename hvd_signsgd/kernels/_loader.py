"""Locates the native extension (hvd_signsgd._native).

HVD_SIGNSGD_NATIVE_PATH=/path/to/_native.<abi>.so loads that file instead of the installed
module (the sanitizer test uses it to run the same tests against an ASan/UBSan build); it is
then also registered as ``hvd_signsgd._native`` so every later import sees the same module.
"""
import importlib.machinery
import importlib.util
import os
import sys

MODULE = "hvd_signsgd._native"
PATH_ENV = "HVD_SIGNSGD_NATIVE_PATH"


def _load_from(path):
    loader = importlib.machinery.ExtensionFileLoader(MODULE, path)
    spec = importlib.util.spec_from_file_location(MODULE, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[MODULE] = module
    return module


def load_native():
    """(module, None) or (None, why it is unavailable).

    A missing extension is not an error (the torch kernels take over); an explicit
    HVD_SIGNSGD_NATIVE_PATH that cannot be loaded is, and raises.
    """
    path = os.environ.get(PATH_ENV)
    if path:
        return _load_from(path), None
    try:
        return importlib.import_module(MODULE), None
    except ImportError as exc:
        return None, f"{MODULE} not importable: {exc}"
