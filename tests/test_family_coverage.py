"""A fixed sample of benchmarks/family_coverage.py: the per-family check, rerun on families that work and on ones
that PTL must refuse at build time with the reason, must reproduce what the results file records."""
import json
import sys
from pathlib import Path

import pytest
import timm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))
import family_coverage  # noqa: E402

RESULTS = json.loads((ROOT / 'benchmarks' / 'results' / 'family_coverage.json').read_text())
ROWS = {r['family']: r for r in RESULTS['rows']}
# cheap; mobilenetv3: features_only of MobileNetV3-style backbones; inception_v3: too small for a 64 px probe
WORKING = ['resnet', 'convnext', 'efficientnet', 'byobnet', 'mobilenetv3', 'inception_v3']
REFUSED = {'vision_transformer': 'not an NCHW map', 'efficientvim': 'gives final features of shape a list of'}


@pytest.mark.parametrize('family', WORKING)
def test_hierarchical_cnn_family_works_as_recorded(family):
    row = family_coverage.check_family(family, model=ROWS[family]['model'], timeout=120)
    assert row['hierarchical'] and row['works'], row
    assert all(row[step] == 'ok' for step in family_coverage.STEPS)
    assert row['size'] == ROWS[family]['size'] and ROWS[family]['works']
    assert row['torchscript'] == ROWS[family]['torchscript']


@pytest.mark.parametrize('family', sorted(REFUSED))
def test_non_hierarchical_family_is_refused_at_build_with_the_reason(family):
    row = family_coverage.check_family(family, model=ROWS[family]['model'], timeout=120)
    assert not row['hierarchical'] and not row['works']
    assert row['failed_step'] == 'build' and row['build'].startswith('ValueError: ')
    assert REFUSED[family] in row['build'] and 'PTL supports CNNs only' in row['build']
    assert row['build'] == ROWS[family]['build']


def test_results_meet_the_target_and_the_table_matches_the_rows():
    stats = family_coverage.summary(RESULTS['rows'])
    assert stats == RESULTS['summary']
    if RESULTS['environment']['timm'] == timm.__version__:  # another timm may have other families
        assert {r['family'] for r in RESULTS['rows']} == set(family_coverage.timm_families())
    assert stats['hierarchical_working_pct'] >= 90
    failing = [r for r in RESULTS['rows'] if r['hierarchical'] and not r['works']]
    assert all(r['failed_step'] == 'build' for r in failing), 'a hierarchical CNN family that fails must fail early'
    md = (ROOT / 'benchmarks' / 'results' / 'family_coverage.md').read_text()
    assert md == family_coverage.markdown(RESULTS['rows'], stats)
