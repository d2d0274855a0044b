"""Process-wide switches of the model runtime, set once at start-up.

The CLI sets them from :class:`pymesh.settings.RuntimeSettings` (``PYMESH_REQUIRE_C``,
``PYMESH_FAST_DECODE``) before any model code runs; the test suite's conftest does the
same from its environment. Library code only reads them, so it never looks at the
environment itself. Imports nothing heavy (``pymesh bootstrap`` sets them without torch).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Switches:
    #: a missing or unusable ``pymesh._C`` is an error instead of a warning and a slow fallback
    require_c: bool = False
    #: one-token CPU decode steps run the preallocated plan (pymesh.model.decode_plan)
    fast_decode: bool = True
    #: a one-sequence plan runs its blocks in one kernel call (csrc/decode_span.cpp); tests
    #: turn it off to compare with the plan's Python loop over the same kernels
    span_kernel: bool = True


#: the one instance the model code reads
SWITCHES = Switches()


def set_switches(*, require_c: bool | None = None, fast_decode: bool | None = None) -> None:
    """Change the given switches (None leaves one as it is)."""
    if require_c is not None:
        SWITCHES.require_c = require_c
    if fast_decode is not None:
        SWITCHES.fast_decode = fast_decode
