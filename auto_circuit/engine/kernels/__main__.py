"""Build the native table kernels ahead of time, or say whether they would be used.

python -m auto_circuit.engine.kernels build [--cache-dir DIR]
python -m auto_circuit.engine.kernels status [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import sys

from auto_circuit.engine.kernels import table_ops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m auto_circuit.engine.kernels",
        description="Build the native table kernels ahead of time, or say whether they "
        "would be used.",
    )
    parser.add_argument("command", choices=["build", "status"])
    parser.add_argument(
        "--cache-dir",
        help="where the library goes (default: $AUTO_CIRCUIT_CACHE_DIR, "
        "$XDG_CACHE_HOME/auto_circuit or ~/.cache/auto_circuit)",
    )
    args = parser.parse_args(argv)
    if args.command == "build":
        try:
            library = table_ops.build(args.cache_dir)
        except (RuntimeError, OSError) as error:
            print(f"build failed: {error}", file=sys.stderr)
            return 1
        print(f"built {library}")
        print(
            "use it with AUTO_CIRCUIT_NATIVE=1, or auto_circuit.engine.kernels.table_ops.enable()"
        )
    print(table_ops.enable(args.cache_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
