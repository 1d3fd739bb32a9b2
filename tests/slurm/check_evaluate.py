"""Checks an evaluate run of the Slurm jobs against the same evaluation in one process.

    python tests/slurm/check_evaluate.py OUT_DIR SINGLE_DIR WORLD

OUT_DIR and SINGLE_DIR hold each run's ``report.json`` and ``layers.svg`` (written by rank 0).  Every number
(perplexity, KL, top-1, the per-layer cosine and relative error, row and token counts, the tokens' sha256) must
be equal, not close: a row's sums depend only on the row and ranks add the gathered rows in row order
(docs/evaluate.md), so the world size cannot move a bit.  The job's report must say WORLD ranks took part and
the one-process report 1.  Exit status 1 with one line per problem, else one summary line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SAME = ("rows", "tokens", "nll", "perplexity", "ref_perplexity", "kl", "top1", "layers", "tokens_sha256",
        "seq_len", "emulate_activations")


def main(out: Path, single: Path, world: int) -> int:
    problems = []
    got, want = (json.loads((d / "report.json").read_text()) for d in (out, single))
    for key in SAME:
        if key not in want:
            problems.append(f"{single}/report.json: no {key!r}")
        elif got.get(key) != want[key]:
            problems.append(f"{out}/report.json: {key} = {got.get(key)!r}, one process gave {want[key]!r}")
    if got.get("world") != world or want.get("world") != 1:
        problems.append(f"world sizes {got.get('world')} (job) and {want.get('world')} (one process), expected "
                        f"{world} and 1")
    if not want.get("kl", 0) > 0 or not want.get("layers"):
        problems.append(f"{single}/report.json: KL {want.get('kl')} and {len(want.get('layers') or [])} layers: "
                        "the check needs a quantized model against a different reference")
    for d in (out, single):
        if not (d / "layers.svg").read_text().startswith("<svg"):
            problems.append(f"{d}/layers.svg is not an SVG")
    for p in problems:
        print(p)
    if problems:
        return 1
    print(f"evaluate on {world} ranks equals 1 process bit for bit: perplexity {got['perplexity']:.6g}, KL "
          f"{got['kl']:.6g}, top-1 {100 * got['top1']:.2f}%, {len(got['layers'])} layers, {got['rows']} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])))
