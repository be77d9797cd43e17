"""Write rate of CacheWriter alone (`bench_store.py`'s write stage), repeated, as JSON lines.

Run it once per tree (PYTHONPATH picks which `sae` it writes with) and alternate the trees, so
two versions of the writer are compared on the same disk in the same session.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_store import write_cache


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/bench-store-write")
    parser.add_argument("--rows", type=int, default=1_500_000)
    parser.add_argument("--label", default="")
    parser.add_argument("--durable", action="store_true", help="stop the clock after os.sync()")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    os.sync()  # start from a clean page cache
    result = write_cache(args.dir, args.rows, durable=args.durable)
    shutil.rmtree(args.dir, ignore_errors=True)
    import sae

    where = str(Path(sae.__file__).parent.parent)
    record = {"label": args.label, "sae": where, "commit": os.environ.get("SAE_BENCH_COMMIT")}
    print(json.dumps(record | result), flush=True)


if __name__ == "__main__":
    main()
