"""Cold and warm load time of the embedded default model.

Cold: a fresh cache folder, so the GGUF file is dequantised and cached. Warm: reloading from the cache.
Run: python benchmarks/load_time.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import median_seconds, row  # noqa: E402

from personaedit.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["PERSONAEDIT_CACHE"] = cache
        cold, _ = median_seconds(lambda: load_model("default"), repeats=1)
        warm, runs = median_seconds(lambda: load_model("default"), repeats=args.repeats)
    print(row("default model, cold load (convert + cache)", f"{cold:.1f} s", "-", None))
    print(row(f"default model, warm load (median of {args.repeats})", f"{warm:.2f} s", "<= 2 s", warm <= 2.0))
    print(f"  warm runs: {', '.join(f'{r:.2f}' for r in runs)}; cold/warm = {cold / warm:.0f}x")


if __name__ == "__main__":
    main()
