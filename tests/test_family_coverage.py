"""A fixed sample of benchmarks/family_coverage.py: the per-family check, rerun on families that work (NCHW,
channels-last and list pyramids) and on one that PTL refuses at build time with the reason, must reproduce what the
results file records; the file must meet the target (every feature-pyramid family works)."""
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
# cheap; mobilenetv3: features_only of MobileNetV3-style backbones; inception_v3: too small for a 64 px probe;
# mambaout: channels-last final features; efficientvim: a list of (B, C, N) ones
WORKING = ['resnet', 'convnext', 'efficientnet', 'byobnet', 'mobilenetv3', 'inception_v3', 'mambaout', 'efficientvim']
REFUSED = {'vision_transformer': 'is not a feature pyramid'}


@pytest.mark.parametrize('family', WORKING)
def test_pyramid_family_works_as_recorded(family):
    row = family_coverage.check_family(family, model=ROWS[family]['model'], timeout=120)
    assert row['pyramid'] and row['works'], row
    assert all(row[step] == 'ok' for step in family_coverage.STEPS)
    assert row['size'] == ROWS[family]['size'] and ROWS[family]['works']
    assert row['torchscript'] == ROWS[family]['torchscript']


@pytest.mark.parametrize('family', sorted(REFUSED))
def test_non_pyramid_token_family_is_refused_at_build_with_the_reason(family):
    row = family_coverage.check_family(family, model=ROWS[family]['model'], timeout=120)
    assert not row['pyramid'] and not row['works']
    assert row['failed_step'] == 'build' and row['build'].startswith('ValueError: ')
    assert REFUSED[family] in row['build'] and 'token or channels-last' in row['build']
    assert row['build'] == ROWS[family]['build']


def test_the_pyramid_rule_reads_feature_info_reductions_alone():
    assert family_coverage.is_pyramid([4, 8, 16, 32]) and family_coverage.is_pyramid([16, 32, 64])
    assert family_coverage.is_pyramid([2, 4, 4, 8, 16])
    assert not family_coverage.is_pyramid([16] * 12) and not family_coverage.is_pyramid([4, 8, 8])
    assert not family_coverage.is_pyramid([4, 8, 16, 8])


def test_results_meet_the_target_and_the_table_matches_the_rows():
    stats = family_coverage.summary(RESULTS['rows'])
    assert stats == RESULTS['summary']
    if RESULTS['environment']['timm'] == timm.__version__:  # another timm may have other families
        assert {r['family'] for r in RESULTS['rows']} == set(family_coverage.timm_families())
    assert stats['pyramids_working'] == stats['pyramids'], [r['family'] for r in RESULTS['rows']
                                                            if r['pyramid'] and not r['works']]
    failing = [r for r in RESULTS['rows'] if not r['works']]
    assert all(r.get('failed_step', 'build') == 'build' for r in failing), 'a family that fails must fail at build'
    table, footer = (ROOT / 'benchmarks' / 'results' / 'family_coverage.md').read_text().rsplit('\n\n', 1)
    assert table + '\n' == family_coverage.markdown(RESULTS['rows'], stats)
    assert footer.startswith(f'Made from {len(RESULTS["rows"])} records; commits ')  # each row names its commit
    assert footer.endswith('Regenerate: `python benchmarks/family_coverage.py --report`.\n')
