"""Documented figures are copied from the files the benchmarks write, never typed in: every table row of
docs/benchmarks.md, and every table row under a Models or Benchmark(s) heading of the README and the other docs,
appears verbatim in a Markdown file under benchmarks/results/; so does every confidence interval quoted in prose,
and the summary line of the family coverage."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEASURED_HEADING = re.compile(r'^#+ (Models|Benchmarks?\b)')
# a paired difference with its 95 % interval, as the reports write it: +0.59 [-0.45, +1.63]
INTERVAL = re.compile(r'[+-]\d+\.\d+ \[[+-]\d+\.\d+, [+-]\d+\.\d+\]')
DOCS = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]


def _results_lines() -> set:
    lines = set()
    for path in (ROOT / 'benchmarks' / 'results').rglob('*.md'):
        lines.update(path.read_text().splitlines())
    return lines


def _measured_table_rows(text: str, everywhere: bool):
    measured, level, fenced = everywhere, 0, False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith('```'):
            fenced = not fenced
        elif line.startswith('#') and not fenced and not everywhere:
            depth = len(line) - len(line.lstrip('#'))
            if MEASURED_HEADING.match(line):
                measured, level = True, depth
            elif measured and depth <= level:
                measured = False
        elif measured and line.startswith('|') and not set(line) <= set('|-: '):
            yield number, line


def test_measured_tables_come_from_results_files():
    results = _results_lines()
    rows = [(path, n, line) for path in DOCS
            for n, line in _measured_table_rows(path.read_text(), everywhere=path.name == 'benchmarks.md')]
    assert len(rows) > 50, 'the docs lost their benchmark tables (or the headings changed)'
    typed_in = [f'{path.relative_to(ROOT)}:{n}: {line[:90]}' for path, n, line in rows if line not in results]
    assert not typed_in, 'rows not found in benchmarks/results/*.md (regenerate, then copy):\n' + '\n'.join(typed_in)


def test_family_coverage_summary_comes_from_its_results_file():
    results = _results_lines()
    quoted = [(path, line) for path in DOCS for line in path.read_text().splitlines()
              if line.startswith('Feature-pyramid families that work:')]
    assert quoted, 'the docs lost the family coverage summary (benchmarks/results/family_coverage.md)'
    typed_in = [f'{path.relative_to(ROOT)}: {line[:90]}' for path, line in quoted if line not in results]
    assert not typed_in, 'not found in benchmarks/results/*.md:\n' + '\n'.join(typed_in)


def test_quoted_intervals_come_from_results_files():
    results = '\n'.join(_results_lines())
    quoted = [(path, m) for path in DOCS for m in INTERVAL.findall(path.read_text().replace('\u2212', '-'))]
    assert len(quoted) > 20
    typed_in = [f'{path.relative_to(ROOT)}: {m}' for path, m in quoted if m not in results]
    assert not typed_in, 'intervals not found in benchmarks/results/*.md:\n' + '\n'.join(typed_in)


def test_every_results_file_is_listed_with_its_command():
    """docs/benchmarks.md names the command behind every file under benchmarks/results/ (quick/ is git-ignored)."""
    text = (ROOT / 'docs' / 'benchmarks.md').read_text()
    section = text[text.index('## Results files and the commands that write them'):]
    section = section[:section.index('\n## ', 1)]
    listed = set()
    for stem, suffixes in re.findall(r'^- `([\w.]+)\.\{([\w,]+)\}`: ', section, flags=re.M):
        listed.update(f'{stem}.{suffix}' for suffix in suffixes.split(','))
    results = ROOT / 'benchmarks' / 'results'
    files = {p.relative_to(results).as_posix() for p in results.rglob('*')
             if p.is_file() and not p.relative_to(results).as_posix().startswith('quick/')}
    assert files - listed == set(), 'results files that docs/benchmarks.md does not list with their command'
    assert listed - files == set(), 'docs/benchmarks.md lists results files that do not exist'
