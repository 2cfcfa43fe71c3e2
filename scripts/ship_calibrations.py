"""Copy the default model's cached calibrations (`personaedit calibrate`, benchmarks/effect_table.py --calibrated)
into the package's calibrations.jsonl, so `edit --calibrate` and the demo find them without measuring.

python scripts/ship_calibrations.py            # then commit src/personaedit/data/resources/calibrations.jsonl

Rows are keyed by the calibration's key (method, persona, budget, questions, reply length, search space); a cached
calibration replaces a shipped one with the same key; a row whose key the current search space no longer produces
(the space changed since it was measured) is dropped, since `stored` would never find it.
"""

from __future__ import annotations

import json
from pathlib import Path

from personaedit.calibration import Budget, calibration_key
from personaedit.fileio import write_text_atomic
from personaedit.models import load_model
from personaedit.models.loading import cache_dir
from personaedit.persona import Persona

SHIPPED = Path(__file__).resolve().parents[1] / "src/personaedit/data/resources/calibrations.jsonl"


def main() -> None:
    lm = load_model("default")
    fingerprint = lm.fingerprint
    rows = {row["key"]: row for row in map(json.loads, SHIPPED.read_text().splitlines())}
    cached = sorted((cache_dir() / "calibration" / fingerprint).glob("*.json"))
    for path in cached:
        row = json.loads(path.read_text())
        rows[row["key"]] = row
    current = {key: row for key, row in rows.items()
               if key == calibration_key(lm, row["method"], Persona.parse(row["persona"]), budget=Budget(**row["budget"]),
                                         questions=row["questions"], max_new_tokens=row["max_new_tokens"])}
    for row in rows.values():
        if row["key"] not in current:
            print(f"  dropped {row['method']} {row['persona']} ({row['key']}): measured under an older search space")
    ordered = sorted(current.values(), key=lambda r: (r["method"], r["persona"]))
    write_text_atomic(SHIPPED, "".join(json.dumps(r, sort_keys=True) + "\n" for r in ordered))
    print(f"{len(ordered)} calibrations in {SHIPPED} ({len(cached)} from {cache_dir() / 'calibration' / fingerprint})")
    for r in ordered:
        chosen = r["chosen"]
        print(f"  {r['method']:8} {r['persona']:22} "
              + ("nothing within budget" if chosen is None else
                 f"strength {chosen['strength']:g} {json.dumps(chosen['options']) if chosen['options'] else ''}"))


if __name__ == "__main__":
    main()
