"""``python -m auto_circuit.data.generate [OUT_DIR]``: regenerate every packaged dataset."""

from __future__ import annotations

import sys
from pathlib import Path

from auto_circuit.data.generate import package_datasets_dir, write_datasets


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print("usage: python -m auto_circuit.data.generate [OUT_DIR]", file=sys.stderr)
        return 2
    root = Path(argv[0]) if argv else package_datasets_dir()
    paths = write_datasets(root)
    total = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} dataset files ({total / 1024:.0f} KiB) under {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
