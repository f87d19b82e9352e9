"""The README's measured tables are copied from the files the benchmarks write, never typed in: every table
row under a Models or Benchmark(s) heading must appear verbatim in a Markdown file under benchmarks/results/."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEASURED_HEADING = re.compile(r'^#+ (Models|Benchmarks?\b)')


def _measured_table_rows(readme: str):
    measured, level = False, 0
    for number, line in enumerate(readme.splitlines(), 1):
        if line.startswith('#'):
            depth = len(line) - len(line.lstrip('#'))
            if MEASURED_HEADING.match(line):
                measured, level = True, depth
            elif measured and depth <= level:
                measured = False
        elif measured and line.startswith('|') and not set(line) <= set('|-: '):
            yield number, line


def test_readme_tables_under_measured_headings_come_from_results_files():
    results = set()
    for path in (ROOT / 'benchmarks' / 'results').rglob('*.md'):
        results.update(path.read_text().splitlines())
    rows = list(_measured_table_rows((ROOT / 'README.md').read_text()))
    assert len(rows) > 50, 'the README lost its benchmark tables (or the headings changed)'
    typed_in = [f'README.md:{n}: {line[:90]}' for n, line in rows if line not in results]
    assert not typed_in, 'rows not found in benchmarks/results/*.md (regenerate, then copy):\n' + '\n'.join(typed_in)
