"""VPGTrans, one file per step of the paper: pairing.py (token pairs, and which the converter is fitted on),
converter.py (the fit: held-out split, `auto`, identity), merge.py (into the projector), stages.py (the
warm-up, fine-tuning and scratch recipes), race.py (the stages in order, and the race against scratch), with
options.py (what a transfer is asked to do), plan.py (what it will do), sources.py, choose.py and report.py.

The package is also the transfer function: ``vpgtrans.transfer(TransferOptions(src=..., dst=...))``.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .options import TransferOptions
    from .race import DryRun, TransferResult


class _CallablePackage(types.ModuleType):
    """`vpgtrans.transfer` is both this package and `race.transfer` (the name is the API's)."""

    def __call__(self, options: TransferOptions, *, echo: Callable[[str], None] = print) -> TransferResult | DryRun:
        """Move a trained VPG to another LLM (VPGTrans), racing scratch when asked; writes `<out>/report.json`."""
        from .race import transfer

        return transfer(options, echo=echo)


sys.modules[__name__].__class__ = _CallablePackage
