"""python -m autogen [--check]: regenerate kernel instantiations (or verify they are current)."""

import argparse
import sys

from autogen import generate


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m autogen", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated files are stale")
    args = parser.parse_args()
    files = generate.render()
    if args.check:
        stale = generate.stale(files)
        for path in stale:
            print(f"stale generated file: {path.relative_to(generate.ROOT)}", file=sys.stderr)
        if stale:
            print("run `make autogen` and commit the result", file=sys.stderr)
        return 1 if stale else 0
    changed = generate.write(files)
    print(f"autogen: {len(files)} files, {len(changed)} written or removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
