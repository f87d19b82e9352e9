"""Datasets, one module per kind (docs/development.md):

- ``offline``: real images that install from package registries (Animal-MNIST, Fashion-MNIST, emoji, emoji of
  four vendors as ReID identities), the few-shot and identity splits, ``to_model_input`` (docs/offline.md).
- ``reid``: readers of ReID folders (Market-1501, DukeMTMC-reID, MSMT17, list files), ``ReIDDataset`` and the
  P x K identity sampler (docs/reid.md).
"""
