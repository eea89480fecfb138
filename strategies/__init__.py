"""Built-in strategies (rank selectors, spatial partitioners, channel clusterers).

Installed as ``hsc_plugin.strategies``; each module registers its classes through the
``hsc_plugin`` entry-point group, exactly as a third-party plugin does.
"""
