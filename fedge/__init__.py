"""fedge: federated learning for edge devices, on Flower and PyTorch."""

import os as _os
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# `fedge.server`, `fedge.client`, ... live in top-level folders (setuptools package-dir).
# An installed wheel maps them; but Flower loads an app from an unpacked bundle (FAB)
# placed first on sys.path, where `fedge/` has no `server/`. Then the subpackages are
# found beside it, in the same tree as this kernel.
_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if _os.path.isfile(_os.path.join(_root, "server", "__init__.py")) and not _os.path.isdir(
    _os.path.join(_here, "server")
):
    __path__.append(_root)

__all__ = ["__version__"]
