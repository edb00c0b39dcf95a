"""Two quality runs side by side: the same systems, nDCG@10 of each, and a paired bootstrap of B - A.

For a question that changes one thing between two ``quality_scifact.py`` runs over the same test
queries, e.g. the generator (SmolLM2-135M vs Gemma 3 270M on the same documents and prompt) or the
number of synthetic queries. Systems are matched by name; a fused system's weight ``(w=...)`` is chosen
per run on its own held-out queries, so it is left out of the match (and shown).

    python benchmarks/compare_quality.py A.json B.json [--label-a smollm2] [--label-b gemma3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import write_results

from inpars.evaluate import paired_bootstrap

WEIGHT = re.compile(r" \(w=([0-9.]+)\)")


def systems(run: dict) -> dict[str, tuple[str, dict[str, float]]]:
    """``{name without its fusion weight: (full name, per-query nDCG@10)}``."""
    return {WEIGHT.sub("", name): (name, per_query) for name, per_query in run["per_query_nDCG@10"].items()}


def compare(a: dict, b: dict, n_samples: int = 1000) -> list[dict]:
    sa, sb = systems(a), systems(b)
    rows = []
    for key in [k for k in sa if k in sb]:
        (name_a, qa), (name_b, qb) = sa[key], sb[key]
        rows.append({"system": key, "a": name_a, "b": name_b, **paired_bootstrap(qa, qb, n_samples=n_samples, seed=0)})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="results JSON of quality_scifact.py (the baseline)")
    ap.add_argument("b", help="results JSON of quality_scifact.py (the change)")
    ap.add_argument("--label-a", default="A")
    ap.add_argument("--label-b", default="B")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--out", default=None, help="write the comparison as JSON")
    args = ap.parse_args(argv)
    a, b = (json.loads(Path(p).read_text(encoding="utf-8")) for p in (args.a, args.b))
    rows = compare(a, b, args.bootstrap)
    if not rows:
        raise SystemExit("the two runs share no system")
    width = max(len(r["system"]) for r in rows)
    print(f"{'system'.ljust(width)}  {args.label_a:>8}  {args.label_b:>8}  {'B - A':>7}  95% CI            W/L/T")
    for r in rows:
        found = [m.group(1) for m in map(WEIGHT.search, (r["a"], r["b"])) if m]
        weights = f"  BM25 weight {' / '.join(found)}" if found else ""
        print(
            f"{r['system'].ljust(width)}  {r['mean_a']:8.4f}  {r['mean_b']:8.4f}  {r['mean_diff']:+7.4f}  "
            f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]  {r['wins']}/{r['losses']}/{r['ties']}{weights}"
        )
    if args.out:
        write_results(
            {
                "a": {"file": args.a, "label": args.label_a, "scope": a.get("scope")},
                "b": {"file": args.b, "label": args.label_b, "scope": b.get("scope")},
                "systems": rows,
            },
            args.out,
        )
    return rows


if __name__ == "__main__":
    main()
