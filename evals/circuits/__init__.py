"""Circuit-identification evals: patching ground truth and SAE-code circuit discovery.

    from saelab.evals.circuits import discover, DiscoverConfig
    result = discover("zoo:tasks-4l", "ioi", config=DiscoverConfig(train_prompts=10, trials=10))
    result.summary()["node_roc_auc"]              # {"mean": ..., "std": ...} on held-out prompts
    write_report(result, "runs/circuits")         # circuits.json, circuits.md, PNGs

Node attribution on any basis (heads, neurons, a dictionary's latents with error nodes):

    from saelab.evals.circuits import attribute, recover
    a = attribute(model, "ioi", "heads", "eap-ig")   # a.scores: per-node effect estimates
    report = recover(model, "ioi", "runs/sae", "eap-ig")  # + exact patching, CPR / CMD curves

Edge scores (EAP, EAP-IG) on the factorized residual graph, named as auto-circuit names them:

    from saelab.evals.circuits import attribute_edges
    e = attribute_edges(model, "ioi", "eap")   # e.edges()["A0.5->A2.3.Q"], e.head_edges()
    f = feature_edges(model, tokens, {hook_a: sae_a, hook_b: sae_b})  # latents (+ error) edges
    edge_faithfulness(model, tokens, e.head_edges())  # f, CPR, CMD of top head-to-head edges
"""

from saelab.evals.circuits.attribution import Attribution, attribute
from saelab.evals.circuits.discover import DEFAULT_SAE, CircuitResult, DiscoverConfig, discover
from saelab.evals.circuits.edge_faithfulness import edge_faithfulness
from saelab.evals.circuits.edges import EdgeAttribution, attribute_edges
from saelab.evals.circuits.faithfulness import faithfulness
from saelab.evals.circuits.feature_edges import FeatureEdges, feature_edges
from saelab.evals.circuits.patching import GroundTruth, ground_truth, ground_truth_sets
from saelab.evals.circuits.recovery import AttributionConfig, recover
from saelab.evals.circuits.report import format_summary, headline, write_report

__all__ = ["DEFAULT_SAE", "Attribution", "AttributionConfig", "CircuitResult", "DiscoverConfig",
           "EdgeAttribution", "FeatureEdges", "GroundTruth", "attribute", "attribute_edges", "discover",
           "edge_faithfulness", "faithfulness", "feature_edges", "format_summary", "ground_truth",
           "ground_truth_sets", "headline", "recover", "write_report"]
