"""Maintainer command: bring the repository's files in line with weights/manifest.json.

    python weights/zoo.py            # render weights/<name>/config.json and README.md, and the table in docs/hub.md
    python weights/zoo.py --check    # only check that they are up to date (exit status 1 if not)
    python weights/zoo.py --table    # print the table

It writes the repository (weights/, docs/), never an installed package, so it is not part of the user's
``ptl-timm`` command line (docs/development.md). ``weights/build.py`` runs the same rendering after a build.
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional

from ptl_timm.hub.model_card import TABLE_MARKERS, manifest_table, replace_manifest_table, write_zoo

REPO_ROOT = Path(__file__).resolve().parent.parent
TABLE_DOCS = (REPO_ROOT / 'docs' / 'hub.md',)


def stale_tables(table: str, docs=TABLE_DOCS) -> List[Path]:
    """The documents whose manifest table differs from ``table``."""
    block = f'{TABLE_MARKERS[0]}{table}{TABLE_MARKERS[1]}'
    return [path for path in docs if block not in path.read_text()]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--manifest', type=Path, help='manifest path (default: weights/manifest.json)')
    parser.add_argument('--check', action='store_true', help='only check that the files are up to date')
    parser.add_argument('--table', action='store_true', help="print the docs' table of the manifest")
    parser.add_argument('--docs', type=Path, nargs='+', default=list(TABLE_DOCS), metavar='MARKDOWN',
                        help='files whose <!-- manifest-table --> block holds the table (default: docs/hub.md)')
    args = parser.parse_args(argv)
    table = manifest_table(args.manifest)
    if args.table:
        sys.stdout.write(table)
        return 0
    stale = write_zoo(args.manifest, check=args.check) + stale_tables(table, args.docs)
    if args.check:
        if stale:
            print(f'Out of date with the manifest: {", ".join(map(str, stale))}. Run: python weights/zoo.py',
                  file=sys.stderr)
            return 1
        print('The model cards and the manifest tables are up to date.')
        return 0
    for path in args.docs:
        replace_manifest_table(path, table)
    print(f'Wrote {len(stale)} file(s) that were out of date' + (f': {", ".join(map(str, stale))}' if stale else '')
          + '.')
    return 0


if __name__ == '__main__':
    sys.exit(main())
