"""A built package (what a wheel contains) carries the weights manifest, so the full-PTL tags register
outside a checkout too. Built with setuptools' build_py, the step that fills a wheel."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = '''import json, timm, ptl_timm
from ptl_timm.hub import manifest, model_card
try:  # model cards belong to the repository's weights/, never beside the package's copy
    zoo = [str(f) for f in model_card.write_zoo()]
except FileNotFoundError as e:
    zoo = str(e)
print(json.dumps(dict(package=ptl_timm.__file__, manifest=str(manifest.MANIFEST_PATH), zoo=zoo,
                      tags=sorted(n for n in manifest.load_manifest() if timm.models.get_pretrained_cfg(n)))))
'''


def _import_from(build_lib: Path, cwd: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(build_lib), HF_HUB_OFFLINE='1')
    result = subprocess.run([sys.executable, '-c', PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.slow
def test_built_package_ships_the_manifest_and_registers_its_tags(tmp_path):
    build_lib = tmp_path / 'lib'
    result = subprocess.run([sys.executable, 'setup.py', '-q', 'build_py', '--build-lib', str(build_lib)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    packaged = build_lib / 'ptl_timm' / '_manifest.json'
    assert packaged.read_bytes() == (ROOT / 'weights' / 'manifest.json').read_bytes()

    names = [entry['name'] for entry in json.loads(packaged.read_text())['checkpoints']]
    assert names, 'the manifest lists no checkpoint: nothing to check'
    seen = _import_from(build_lib, tmp_path)  # not the checkout: it has no weights/ beside it
    assert Path(seen['package']).parent == build_lib / 'ptl_timm'
    assert Path(seen['manifest']) == packaged and seen['tags'] == sorted(names)
    assert seen['zoo'] == f'No weights manifest at {build_lib / "weights" / "manifest.json"}.'
    assert not any((packaged.parent / name).exists() for name in names)

    packaged.unlink()  # what a wheel gave before it carried the manifest: no full-PTL tags
    assert _import_from(build_lib, tmp_path)['tags'] == []
