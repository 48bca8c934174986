"""Counterfactual fine-tuning objectives (docs/method.md section 5), registered as plugins.

Every fine-tuning mode (``cft.modes``) names an objective registered through the
``segcft_register_objectives`` hook; the built-ins none, reg, seg and pos-seg register in
``segcft.builtin`` like any plugin. The package itself imports nothing, so that the registry
imports ``configs`` without torch. Modules:

- ``modes``: the registered modes, their seeds, the guides they load and the dataset checks
  (torch-free, used by the config system);
- ``configs``: the built-ins' config classes (torch-free);
- ``base``: ``CFTObjective``, the Lagrangian every objective shares, and ``build_objective``;
- ``area``: the soft-area terms of the segmentor-guided modes;
- ``locality``: the optional locality penalty of the segmentor-guided modes;
- ``guided``: the built-in objectives (segmentor and regressor guidance).
"""
