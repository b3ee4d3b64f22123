"""Print kdistill's import graph and the architecture violations that tests/test_architecture.py checks.

    python scripts/import_graph.py               # violations per check, then a summary
    python scripts/import_graph.py --graph       # also every edge: importer -> imported (first line)
    python scripts/import_graph.py --out FILE    # also write the same text to FILE

The checking code lives in tests/test_architecture.py (one copy); this script only loads and prints it.
Exit status 1 when there is any violation.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _checks():
    spec = importlib.util.spec_from_file_location("_architecture_checks", REPO / "tests" / "test_architecture.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graph", action="store_true", help="print every edge of the import graph")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)

    arch = _checks()
    tree = arch.scan(arch.SRC)
    sections = [
        ("import cycles", arch.cycle_violations(tree)),
        ("private names imported across modules", arch.private_import_violations(tree)),
        ("function-level imports of kdistill modules", arch.function_level_violations(tree)),
        ("imports of kdistill.cli", arch.cli_import_violations(tree)),
        (f"modules over {arch.MAX_LINES} lines", arch.size_violations(tree)),
    ]
    lines = [f"kdistill architecture check: {len(tree.modules)} modules under {arch.SRC.relative_to(REPO)}", ""]
    for title, found in sections:
        lines.append(f"== {title}: {len(found)}")
        lines.extend(found)
        lines.append("")
    components = [c for c in arch._strongly_connected(arch.import_graph(tree)) if len(c) > 1]
    lines.append(f"== modules that lie on a cycle (strongly connected groups): {len(components)}")
    lines.extend("  " + ", ".join(sorted(c)) for c in components)
    lines.append("")
    if args.graph:
        lines.append("== import graph (importer -> imported, first line)")
        for importer, edges in sorted(arch.import_graph(tree).items()):
            for imported, line in sorted(edges.items()):
                lines.append(f"{tree.where(importer, line)}: {importer} -> {imported}")
        lines.append("")
    lines.append("summary: " + "; ".join(f"{title}: {len(found)}" for title, found in sections))
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out:
        args.out.write_text(text)
    return 1 if any(found for _, found in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
