"""The module named in the ``hsc_plugin`` entry-point group: one hook implementation."""

from __future__ import annotations

import hsc_plugin

from hsc_example_selector.selector import UniformMACsSelector


@hsc_plugin.hookimpl
def hsc_rank_selectors() -> list[type]:
    return [UniformMACsSelector]
