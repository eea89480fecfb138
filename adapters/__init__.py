"""Framework glue: NNI and torch-pruning adapters (optional extras ``[nni]`` and ``[tp]``).

Installed as ``hsc_plugin.adapters``.
"""
