"""Lazy-neuron activation sparsity: measure it, sparsify MLPs, predict the active set.

    from saelab.evals.sparsity import measure, write_report, format_summary
    report = measure("zoo:pystdlib-4l", tokens=65536)
    write_report(report, "runs/sparsity")    # sparsity.json, sparsity.md, PNGs
    print(format_summary(report))
"""

from saelab.evals.sparsity.measure import measure, mlp_hooks
from saelab.evals.sparsity.report import format_summary, write_report

__all__ = ["format_summary", "measure", "mlp_hooks", "write_report"]
