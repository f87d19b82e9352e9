"""What the benchmarks record and compute (benchmarks/common.py, the benchmark core): the environment of a result,
the results store, the statistics behind the documented claims against hand computations, and reports that
regenerate from their records to the digit."""
import argparse
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from common import (  # noqa: E402
    RESULTS_DIR,
    Store,
    environment,
    fmt_ci,
    mean_of_means_ci95,
    paired,
    provenance,
    repo_path,
    run_key,
    shard,
    stamp,
    store_file,
    t_ci95,
)


def test_t_interval_of_a_mean():
    mean, lo, hi = t_ci95([1.0, 2.0, 3.0])  # sd 1, n 3, t(2) = 4.303
    assert mean == 2.0 and hi - mean == pytest.approx(4.303 / math.sqrt(3))
    assert mean - lo == pytest.approx(hi - mean)
    assert all(math.isnan(v) for v in t_ci95([5.0])[1:])


def test_mean_of_means_uses_the_standard_errors_and_welch_degrees_of_freedom():
    # means 2 and 4; squared standard errors var([1, 3]) / 2 = 1 and var([2, 4, 6]) / 3 = 4 / 3
    se2 = [1.0, 4.0 / 3.0]
    df = sum(se2) ** 2 / (se2[0] ** 2 / 1 + se2[1] ** 2 / 2)  # 2.88 -> t(2) = 4.303 (floored: conservative)
    assert int(df) == 2
    mean, lo, hi = mean_of_means_ci95([[1.0, 3.0], [2.0, 4.0, 6.0], [7.0]])  # the single value is left out
    assert mean == 3.0
    assert hi - mean == pytest.approx(4.303 * math.sqrt(sum(se2)) / 2)
    assert math.isnan(mean_of_means_ci95([[1.0]])[0])


def test_results_record_the_cpu_and_its_vector_extensions():
    """The kernels torch picks for a CPU's vector extensions change a result's last digits (an AVX-512 machine
    and an AVX2 one do not give the same accuracies): every result names them."""
    import torch

    env = environment()
    assert env['cpu'] and env['torch_cpu_capability'] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(env['cpu_flags'], list) and all(isinstance(f, str) for f in env['cpu_flags'])
    if Path('/proc/cpuinfo').is_file() and ' avx2 ' in f' {Path("/proc/cpuinfo").read_text()} ':
        assert 'avx2' in env['cpu_flags']


def test_store_appends_stamped_records_and_resumes_by_key(tmp_path):
    store = Store(tmp_path / 'runs.jsonl')
    assert store.records() == [] and store.done() == set()
    a, b = run_key(dict(seed=0, variant='shared')), run_key(dict(variant='shared', seed=1))
    assert a == run_key(dict(variant='shared', seed=0)) and a != b  # the fields, not their order
    stamped = stamp()
    assert stamped['commit'] == stamped['env']['git_commit'] and stamped['core'] == stamped['env']['ptl_core_hash']
    store.append(dict(key=a, acc=1.0, core='measured'), stamped)  # a worker's own core hash wins
    store.append(dict(key=b, error='RuntimeError: x'), stamped)
    assert store.done() == {a} and store.latest()[a]['core'] == 'measured'
    store.append(dict(key=b, acc=2.0), stamped)  # a rerun of a failed key replaces it
    assert store.done() == {a, b} and [r['key'] for r in store.latest().values()] == [a, b]
    assert len(store.records()) == 3 and all(r['env'] == stamped['env'] for r in store.records())


def test_a_store_is_named_as_its_report_command_names_it(tmp_path):
    assert store_file('out/runs.jsonl') == Path('out/runs.jsonl')
    with pytest.raises(argparse.ArgumentTypeError, match=r'runs.json: a results store is a .jsonl file'):
        store_file('runs.json')
    assert repo_path(RESULTS_DIR / 'runs.jsonl') == 'benchmarks/results/runs.jsonl'
    assert repo_path(tmp_path / 'runs.jsonl') == str(tmp_path / 'runs.jsonl')  # outside the repository: as given


def test_shards_split_a_grid_without_overlap():
    items = list(range(7))
    parts = [shard(items, f'{i}/3') for i in range(3)]
    assert sorted(sum(parts, [])) == items and shard(items, None) == items
    with pytest.raises(ValueError, match='0 <= i < n'):
        shard(items, '3/3')


def test_paired_differences_and_their_report_string():
    assert paired({0: 3.0, 1: 5.0, 2: 1.0}, {1: 4.0, 0: 1.0}) == [2.0, 1.0]
    mean, lo, hi = t_ci95([2.0, 1.0])
    assert fmt_ci([2.0, 1.0]) == f'{mean:+.2f} [{lo:+.2f}, {hi:+.2f}]' and fmt_ci([0.5]) == '+0.50 (n=1)'
    line = provenance([dict(commit='abc', core='c1'), dict(commit='abc', core='c2')], 'python x.py --report')
    assert '`abc` (2)' in line and '`c1` (1), `c2` (1)' in line and 'python x.py --report' in line


@pytest.mark.parametrize('name', ['transfer_default', 'transfer_long', 'cell_scale', 'demo'])
def test_transfer_reports_regenerate_from_their_records_to_the_digit(name, tmp_path):
    """The committed report of each transfer results store is exactly what --report writes from its records."""
    import transfer

    store = RESULTS_DIR / f'{name}.jsonl'
    records = list(Store(store).latest().values())
    assert records and all(r['commit'] and r['core'] and r['env'] for r in records)
    transfer.report(records, tmp_path / name, transfer.report_command(store))
    assert (tmp_path / f'{name}.md').read_text() == (RESULTS_DIR / f'{name}.md').read_text()


@pytest.mark.parametrize('name, reference', [('emoji_reid', None), ('emoji_reid_xeon', 'emoji_reid'),
                                             ('reid_retrieval', None)])
def test_reid_reports_regenerate_from_their_records_to_the_digit(name, reference, tmp_path):
    """The committed ReID reports (retired variants' rows, the target section, another machine's runs paired) are
    exactly what --report writes from the records: the command their footer names."""
    import emoji_reid
    import reid_retrieval

    store = RESULTS_DIR / f'{name}.jsonl'
    records = list(Store(store).latest().values())
    assert records and all(r['commit'] and r['core'] and r['env'] for r in records)
    committed = (RESULTS_DIR / f'{name}.md').read_text()
    script = 'reid_retrieval' if name == 'reid_retrieval' else 'emoji_reid'
    command = f'python benchmarks/{script}.py --report --out benchmarks/results/{name}.jsonl' + (
        f' --reference benchmarks/results/{reference}.jsonl' if reference else '')
    assert committed.endswith(f'Regenerate: `{command}`.\n')
    if name == 'reid_retrieval':
        reid_retrieval.report(records, tmp_path / name, command)
    else:
        emoji_reid.report(records, tmp_path / name, command, RESULTS_DIR / f'{reference}.jsonl' if reference else None)
    assert (tmp_path / f'{name}.md').read_text() == committed and (tmp_path / f'{name}.png').is_file()


def test_model_table_regenerates_from_its_records(tmp_path):
    import model_table

    data = json.loads((RESULTS_DIR / 'models.json').read_text())
    assert data['commit'] and data['core'] and data['env']
    model_table.report(data, tmp_path / 'models.md')
    assert (tmp_path / 'models.md').read_text() == (RESULTS_DIR / 'models.md').read_text()


@pytest.mark.slow
def test_transfer_grid_runs_resumes_and_reports_through_the_store(tmp_path, monkeypatch, capsys):
    """benchmarks/transfer.py end to end, tiny: the control is the cells_removed model, every record is stamped,
    a rerun of the same grid resumes (runs nothing), and --report rewrites the same report from the records."""
    import transfer

    monkeypatch.setenv('PTL_TIMM_CACHE', str(tmp_path))
    out = tmp_path / 'grid.jsonl'
    argv = ['--quick', '--variants', 'control,shared', '--epochs', '1', '--min-steps', '2', '--img-size', '32',
            '--workers', '1', '--out', str(out)]
    transfer.main(argv)
    records = list(Store(out).latest().values())
    assert [r['variant'] for r in records] == ['control', 'shared'] and not any('error' in r for r in records)
    assert all(r['commit'] and r['core'] and r['env']['ptl_core_hash'] for r in records)
    shared = records[1]
    assert 0 <= shared['test_acc_no_cells'] <= 100 and 'test_acc_no_cells' not in records[0]
    report = out.with_suffix('.md').read_text()
    capsys.readouterr()
    transfer.main(argv)
    assert '0 runs to do (2 already in' in capsys.readouterr().out and len(Store(out).records()) == 2
    transfer.main(['--report', '--out', str(out)])
    assert out.with_suffix('.md').read_text() == report and out.with_suffix('.png').is_file()


def test_overhead_sweep_statistics_and_thread_counts():
    """The pair-ratio summary and the thread list of ``overhead.py --threads-sweep`` (issue 26)."""
    import os

    import overhead

    q = overhead._quantiles([1.3, 1.0, 1.1, 1.2, 5.0])
    assert (q['median'], q['min'], q['max'], q['q1'], q['q3']) == (1.2, 1.0, 5.0, 1.1, 1.3)
    assert overhead.thread_counts('2,1,0,2') == sorted({1, 2, os.cpu_count()})
    assert overhead._ratio_cell(q, target=1.1) == '1.200x (1.000-5.000) (miss)'
    assert overhead._ratio_cell(None) == '-'


@pytest.mark.parametrize('stem, mode', [('overhead', []), ('overhead_threads', ['--threads-sweep']),
                                        ('overhead_profile', ['--profile']),
                                        ('overhead_widths', ['--static-widths', '0.125'])])
def test_overhead_report_rewrites_each_stored_table_from_its_json(tmp_path, stem, mode):
    """``--report`` (no measuring) rewrites a stored table of ``overhead.py`` from its JSON: every line as stored, the
    footer naming the same commits and core hashes and the command with this ``--out``."""
    import shutil

    import overhead
    from common import RESULTS_DIR

    shutil.copy(RESULTS_DIR / f'{stem}.json', tmp_path / f'{stem}.json')
    overhead.main([*mode, '--report', '--out', str(tmp_path / 'overhead.json')])
    stored, new = ((d / f'{stem}.md').read_text().split(' Regenerate: ') for d in (RESULTS_DIR, tmp_path))
    assert new[0] == stored[0] and 'Made from' in new[0].rsplit('\n\n', 1)[1]
    assert new[1].startswith(f'`python benchmarks/overhead.py {" ".join(mode)}'.replace('  ', ' '))
    assert new[1].endswith(f'--report --out {tmp_path / "overhead.json"}`.\n')


@pytest.mark.slow
def test_overhead_sweep_and_profile_quick(tmp_path):
    """``--threads-sweep --profile --quick`` runs every step (eager) and writes its tables under quick/."""
    import json

    import overhead

    overhead.main(['--threads-sweep', '--profile', '--quick', '--out', str(tmp_path / 'overhead.json')])
    sweep = json.loads((tmp_path / 'quick' / 'overhead_threads.json').read_text())
    assert set(sweep['results']) == {f'{b}/{t}/eager' for b in ('resnet18', 'mobilenetv2_100') for t in (1, 2)}
    for entry in sweep['results'].values():
        assert len(entry['times']['ptl']['train']) == 3 and entry['infer']['min'] <= entry['infer']['median']
    assert 1 < sweep['static']['resnet18']['flops'] < 1.1
    md = (tmp_path / 'quick' / 'overhead_threads.md').read_text()
    assert '| resnet18 | 2 | eager |' in md
    prof = json.loads((tmp_path / 'quick' / 'overhead_profile.json').read_text())['profile']
    kinds = prof['kinds']
    assert kinds['infer']['convolution'] > 0 and kinds['train']['gates and state mix (element-wise)'] > 0
    assert 'Where the ladder of ptl_resnet18' in (tmp_path / 'quick' / 'overhead_profile.md').read_text()
