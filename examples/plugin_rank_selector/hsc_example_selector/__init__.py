"""Example third-party plugin for hsc-plugin: the ``uniform_macs`` rank selector."""

from hsc_example_selector.selector import UniformMACsSelector

__all__ = ["UniformMACsSelector"]
__version__ = "0.1.0"
