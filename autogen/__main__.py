"""python -m autogen [--cuda] [--filter PATTERNS] [--list]: write the generated sources of a
build into build/generated/ (setup.py does this itself; run it to inspect the output)."""

import argparse
import os
import sys

from autogen import generate, registry


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m autogen", description=__doc__)
    parser.add_argument("--cuda", action="store_true", help="include the CUDA families")
    parser.add_argument("--filter", default=os.environ.get("NATTEN_KERNEL_FILTER", ""),
                        help="family:dtype:head_dim:rank globs, comma-separated (CUDA families only)")
    parser.add_argument("--list", action="store_true", help="print the instantiations, write nothing")
    args = parser.parse_args()
    kernels = registry.kernels(args.cuda, args.filter)
    if args.list:
        for k in kernels:
            print(k.name)
        return 0
    files = generate.render(kernels)
    changed = generate.write(files)
    print(f"autogen: {len(kernels)} instantiations, {len(files)} files, {len(changed)} written or removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
