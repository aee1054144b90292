"""Only what pyproject.toml cannot say: a .pth file in site-packages that runs vpgtrans_torchvision_guard at start.

Why the guard exists: vpgtrans_torchvision_guard.py. A plain install gets the .pth through data_files; an editable
one (`pip install -e`) installs no data_files, so the .pth is written into the editable wheel beside setuptools' own.
"""

import os
import sys
import sysconfig

from setuptools import setup
from setuptools.command.editable_wheel import editable_wheel

PTH = "vpgtrans-torchvision-guard.pth"


class _WithGuard:
    """An editable-wheel strategy that also writes the guard's .pth (everything else is the wrapped strategy's)."""

    def __init__(self, strategy):
        self.strategy = strategy

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc):
        return self.strategy.__exit__(*exc)

    def __call__(self, wheel, files, mapping):
        self.strategy(wheel, files, mapping)
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), PTH), encoding="utf-8") as f:
            wheel.writestr(PTH, f.read())


class EditableWheel(editable_wheel):
    """`pip install -e`: setuptools' editable wheel plus the guard's .pth."""

    def _select_strategy(self, *args, **kwargs):
        return _WithGuard(super()._select_strategy(*args, **kwargs))


# data_files install relative to the environment's prefix; where site-packages lies under it depends on the Python.
SITE = os.path.relpath(sysconfig.get_path("purelib"), sys.prefix)
setup(data_files=[(SITE, [PTH])], cmdclass={"editable_wheel": EditableWheel})
