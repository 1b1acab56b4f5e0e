"""autoprune: automated channel pruning and mixed-precision quantization search.

Subpackages: ``models`` (zoo, checkpoints), ``data`` (datasets, splits, loaders), ``graph`` (channel
dependency analysis), ``pruning`` (apply widths, save/load architecture-as-data), ``quantization``,
``cost``, ``train``, ``evaluate``, ``infcop``, and — installed inside this namespace — ``envs``, ``agents``
and ``search_spaces``.
"""

__version__ = "0.1.0"
