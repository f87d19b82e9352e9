"""Metadata lives in setup.cfg. This file only ships weights/manifest.json inside the built package (as
ptl_timm/_manifest.json), so that a wheel install registers the full-PTL pretrained tags too; the repository
keeps its one copy in weights/, which editable installs read directly."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

MANIFEST = Path('weights') / 'manifest.json'


class BuildPyWithManifest(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads weights/manifest.json from the checkout
            return
        target = Path(self.build_lib) / 'ptl_timm' / '_manifest.json'
        self.mkpath(str(target.parent))
        self.copy_file(str(MANIFEST), str(target))


setup(cmdclass={'build_py': BuildPyWithManifest})
