"""Offline assets: real images and real ImageNet weights that install from package registries (docs/offline.md)."""
