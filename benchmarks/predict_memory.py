"""Peak memory of `eventcoder predict` at two input sizes, against reading the whole file first.

    python benchmarks/predict_memory.py [--model models/eventcoder] [--small 5000] [--large 50000]

Each run is a separate process; peak RSS is read from the kernel (ru_maxrss of that child). The
baseline is the hand-rolled approach: pandas reads the whole file, the model codes the whole
column, pandas writes the result. Streaming keeps our peak flat as the input grows ten times.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _harness import REPO, print_table

NAIVE = """
import sys, pandas as pd
from eventcoder.inference import Predictor
frame = pd.read_json(sys.argv[2], lines=True)
rows = Predictor.load(sys.argv[1]).predict(frame["text"].tolist())
pd.concat([frame, pd.DataFrame(rows)], axis=1).to_json(sys.argv[3], orient="records", lines=True)
"""


def peak_rss_mib(command: list[str]) -> float:
    """Run one command in a wrapper process and return that process tree's peak RSS."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def write_input(path: Path, rows: int) -> None:
    sentences = [json.loads(line)["text"] for line in (REPO / "data" / "prepared" / "test.jsonl").open()]
    with path.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            handle.write(json.dumps({"id": i, "text": sentences[i % len(sentences)]}) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "eventcoder"))
    parser.add_argument("--small", type=int, default=5000)
    parser.add_argument("--large", type=int, default=50000)
    args = parser.parse_args()
    if not (Path(args.model) / "eventcoder.json").is_file():
        print(f"{args.model} missing: run `make train` first", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (args.small, args.large):
            source = Path(tmp) / f"in-{size}.jsonl"
            write_input(source, size)
            ours = peak_rss_mib(
                [
                    sys.executable,
                    "-m",
                    "eventcoder.cli",
                    "--quiet",
                    "predict",
                    "--model",
                    args.model,
                    "--input",
                    str(source),
                    "--output",
                    str(Path(tmp) / f"out-{size}.jsonl"),
                ]
            )
            naive = peak_rss_mib(
                [sys.executable, "-c", NAIVE, args.model, str(source), str(Path(tmp) / f"naive-{size}.jsonl")]
            )
            results.append({"rows": size, "eventcoder_peak_mib": ours, "read_all_peak_mib": naive})
    print_table(results, ["rows", "eventcoder_peak_mib", "read_all_peak_mib"])
    growth_ours = results[1]["eventcoder_peak_mib"] / results[0]["eventcoder_peak_mib"]
    growth_naive = results[1]["read_all_peak_mib"] / results[0]["read_all_peak_mib"]
    print(
        f"input x{args.large / args.small:.0f}: eventcoder peak x{growth_ours:.2f}, read-all peak x{growth_naive:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
