"""SAE evaluation: reconstruction, latent statistics, spliced loss, reports and plots.

    from saelab.evals import evaluate, write_report, format_summary
    report = evaluate("runs/sae", tokens=65536)   # the dictionary directory names model and hook
    write_report(report, "runs/sae")             # eval.json, eval.md, two PNGs
    print(format_summary(report))

Feature quality (sparse probing, absorption) on exact Python labels: `saelab.evals.probes`.
"""

from saelab.evals.evaluate import evaluate
from saelab.evals.probes import probes
from saelab.evals.reconstruction import reconstruction_stats
from saelab.evals.report import format_summary, write_report

__all__ = ["evaluate", "format_summary", "probes", "reconstruction_stats", "write_report"]
