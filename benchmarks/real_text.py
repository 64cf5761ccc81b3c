"""Quality on real news text nobody wrote for this project (evaluation only, never training).

    python benchmarks/real_text.py [--model models/eventcoder] [--data ../shared/data]

UCDP GED headlines (CC BY 4.0; Davies, Pettersson & Öberg 2023; Sundberg & Melander 2013):
  actor1/actor2 from side_a/side_b: `Government of X` is State forces when the event is in X and
  External/Other forces otherwise, `Civilians` is Civilians, any other side is an organised armed
  group, scored as Rebel groups in state-based events (type 1); non-state events (type 2) are left
  out of the actor scores because UCDP does not say whether a group is a rebel group or a militia.
  Event category: one-sided violence (type 3) is Violence against civilians; types 1 and 2 are armed
  violence (Battles or Explosions/Remote violence).
PLOVER gold standard (CC BY-SA 4.0, Open Event Data Alliance 2016): source and target sectors to
  actor types (GOV/MIL/COP or a bare country code: State forces; REB/INS: Rebel groups; CVL/REF:
  Civilians; OPP: Protesters in PROTEST events, otherwise Political militias; IGO: External/Other
  forces; no target: none).
The data stay in ../shared/data; this script reads them and prints scores and main confusions.
"""

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from _harness import REPO

ARMED = {"Battles", "Explosions/Remote violence"}
ACLED_LIKE = {"ASSAULT", "FIGHT", "PROTEST", "COERCE"}
VAC = "Violence against civilians"


def ucdp_gold(row: dict[str, str]) -> dict[str, Any]:
    kind = int(float(row["type_of_violence"]))

    def actor(side: str) -> str | None:
        if side.startswith("Government of"):
            return "State forces" if row["country"] in side else "External/Other forces"
        if side == "Civilians":
            return "Civilians"
        return "Rebel groups" if kind == 1 else None

    return {
        "text": row["source_headline"],
        "category": "civilians" if kind == 3 else "armed",
        "actor1": actor(row["side_a"]),
        "actor2": actor(row["side_b"]),
    }


def plover_actor(parties: Any, event: str) -> str:
    if not isinstance(parties, list) or not parties:  # a few records hold "" or a stray string
        return "none"
    party = parties[0]
    sector = party.get("sector")
    if sector in ("GOV", "MIL", "COP") or (
        sector is None and len(party.get("code", "")) == 3 and party.get("code") != "IGO"
    ):
        return "State forces"
    return {
        "REB": "Rebel groups",
        "INS": "Rebel groups",
        "CVL": "Civilians",
        "REF": "Civilians",
        "IGO": "External/Other forces",
        "OPP": "Protesters" if event == "PROTEST" else "Political militias",
    }.get(sector or party.get("code"), "Political militias")


def category(event_type: str) -> str:
    return "armed" if event_type in ARMED else "civilians" if event_type == VAC else "other"


def scores(gold: list[str], predicted: list[str]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "n": len(gold),
        "accuracy": accuracy_score(gold, predicted),
        "macro_f1": f1_score(gold, predicted, average="macro", labels=sorted(set(gold)), zero_division=0),
    }


def set_scores(gold: list[set[str]], predicted: list[set[str]]) -> dict[str, Any]:
    """Per actor type: F1 of 'this type is one of the two sides'; macro over the gold types."""
    from sklearn.metrics import f1_score

    types = sorted(set().union(*gold))
    f1 = [f1_score([t in g for g in gold], [t in p for p in predicted], zero_division=0) for t in types]
    missed = Counter(t for g, p in zip(gold, predicted, strict=True) for t in g - p).most_common(4)
    return {
        "n": len(gold),
        "accuracy": sum(g <= p for g, p in zip(gold, predicted, strict=True)) / len(gold),
        "macro_f1": sum(f1) / len(f1),
        "confusions": "missed: " + "; ".join(f"{t} ({n})" for t, n in missed),
    }


def confusions(gold: list[str], predicted: list[str], top: int = 4) -> str:
    pairs = Counter((g, p) for g, p in zip(gold, predicted, strict=True) if g != p).most_common(top)
    return "; ".join(f"{g} -> {p} ({n})" for (g, p), n in pairs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "eventcoder"))
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--json", help="also write the scores here")
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "ucdp_ged_sample.csv").is_file() or not (data / "plover_gsr.jsonl").is_file():
        print(f"skipped: real-text sets not found in {data} (they are not part of this repository)")
        return 0
    if not (Path(args.model) / "eventcoder.json").is_file():
        print(f"{args.model} missing: run `make train` first", file=sys.stderr)
        return 2
    from eventcoder.inference import Predictor

    predictor = Predictor.load(args.model)
    results: dict[str, Any] = {}

    with (data / "ucdp_ged_sample.csv").open(encoding="utf-8") as handle:
        ucdp = [ucdp_gold(row) for row in csv.DictReader(handle)]
    predicted = predictor.predict([row["text"] for row in ucdp])
    results["ucdp/event_category"] = scores(
        [r["category"] for r in ucdp], [category(p["event_type"]) for p in predicted]
    )
    results["ucdp/event_category"]["confusions"] = confusions(
        [r["category"] for r in ucdp], [category(p["event_type"]) for p in predicted]
    )
    # UCDP's side_a is the government by convention, not the side that acted: score actor types
    # as an unordered pair (is each side's type among the two predicted actors?).
    gold_sets = [{r["actor1"], r["actor2"]} - {None} for r in ucdp if r["actor1"] and r["actor2"]]
    guess_sets = [
        {p["actor1"], p["actor2"]} for r, p in zip(ucdp, predicted, strict=True) if r["actor1"] and r["actor2"]
    ]
    results["ucdp/actor_types"] = set_scores(gold_sets, guess_sets)

    with (data / "plover_gsr.jsonl").open(encoding="utf-8") as handle:
        plover = [json.loads(line) for line in handle]
    predicted = predictor.predict([row["text"] for row in plover])
    # Event or not: PLOVER's material-conflict events are what the ACLED schema codes; verbal
    # events (DEMAND, REJECT, THREATEN, ...) are `none` here.
    is_event = ["event" if row["event"] in ACLED_LIKE else "none" for row in plover]
    said = ["none" if p["sub_event_type"] == "none" else "event" for p in predicted]
    results["plover/event_or_none"] = {**scores(is_event, said), "confusions": confusions(is_event, said)}
    for task, field in (("actor1", "source"), ("actor2", "target")):
        pairs = [
            (plover_actor(row.get(field), row["event"]), p[task])
            for row, p in zip(plover, predicted, strict=True)
            if row["event"] in ACLED_LIKE
        ]
        gold, guess = [g for g, _ in pairs], [p for _, p in pairs]
        results[f"plover/{task}"] = {**scores(gold, guess), "confusions": confusions(gold, guess)}

    print(f"{'set/task':22s} {'n':>4s} {'accuracy':>9s} {'macro_f1':>9s}  main confusions (gold -> predicted)")
    for name, values in results.items():
        print(
            f"{name:22s} {values['n']:4d} {values['accuracy']:9.3f} {values['macro_f1']:9.3f}  {values['confusions']}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
