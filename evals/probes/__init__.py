"""Feature quality without a judge: sparse probing and absorption on exact Python labels.

    from saelab.evals.probes import probes, write_probes_report
    report = probes("runs/sae")               # held-out Python files of the dictionary's data
    write_probes_report(report, "runs/sae")   # probing.json, probing.md, probing.png

Labels come from Python's `tokenize` (`labels`), aligned to the model's tokens; probing and
absorption follow SAEBench's definitions (`probing`, `absorption`).
"""

from saelab.evals.probes.report import format_probes_summary, write_probes_report
from saelab.evals.probes.run import probes

__all__ = ["format_probes_summary", "probes", "write_probes_report"]
