"""Federated learning with secure aggregation: hospitals train one model, images never leave them.

Sans-I/O protocol logic, with thin asyncio adapters over :mod:`mpc.net`:

- :mod:`fl.config`: the federation TOML, every key checked.
- :mod:`fl.data`: image folders (PNG, JPEG, DICOM) checked, loaded, split.
- :mod:`fl.models`, :mod:`fl.augment`: models and augmentations by name; the flat weight layout.
- :mod:`fl.optim`, :mod:`fl.training`: local training and evaluation on a node.
- :mod:`fl.aggregation`: FedAvg weights, the weighted mean, the server step.
- :mod:`fl.secagg`: secure aggregation (pairwise masks, or one mask per node removed by a dealer): node, hub and dealer stages.
- :mod:`fl.dealer`: ``primia dealer``, the crypto provider of dealer-masked aggregation.
- :mod:`fl.messages`: message kinds and their checks.
- :mod:`fl.node_protocol`, :mod:`fl.hub_protocol`: the two state machines (no sockets, no clocks).
- :mod:`fl.node`, :mod:`fl.hub`, :mod:`fl.transport`: the servers and the round loop.
- :mod:`fl.metrics`, :mod:`fl.report`, :mod:`fl.checkpoint`, :mod:`fl.files`: metrics, the report and plots, checkpoints, atomic files.
- :mod:`fl.demo`: ``primia demo``.

See docs/federation.md.  The package imports nothing itself; each module imports what it needs.
"""
