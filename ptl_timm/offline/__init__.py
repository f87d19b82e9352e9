"""Real ImageNet weights that install from package registries (docs/offline.md); the images are in
``ptl_timm.data.offline``."""
