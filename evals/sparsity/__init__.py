"""Lazy-neuron activation sparsity: measure it, sparsify MLPs, predict the active set.

    from saelab.evals.sparsity import SparsityConfig, run, write_report, format_summary
    report = run("zoo:pystdlib-4l", tokens=65536)  # measure() + the sweep + the predictor
    report = run("zoo:pystdlib-4l", config=SparsityConfig(modes=("topk",), predictor=False))
    write_report(report, "runs/sparsity")    # sparsity.json, sparsity.md, PNGs
    print(format_summary(report))
"""

from saelab.evals.sparsity.measure import measure, mlp_hooks
from saelab.evals.sparsity.modes import MODES, Sparsifier, calibrate, sweep
from saelab.evals.sparsity.report import format_summary, write_report
from saelab.evals.sparsity.run import SparsityConfig, run

__all__ = ["MODES", "Sparsifier", "SparsityConfig", "calibrate", "format_summary", "measure", "mlp_hooks",
           "run", "sweep", "write_report"]
