"""The random-rotation basis: the MLP neurons' activations in a random orthogonal basis, the
baseline dictionary latents are compared with (benchmarks/circuit_faithfulness.py)."""

import math

import pytest
import torch
from test_attribution import FLOAT32_NOISE, GRADIENT_METHODS, LINEAR_HOOK
from test_circuits_patching import TASK, tiny_model

from saelab.evals.circuits.attribution import Sources, attribute, exact, patch_mask
from saelab.evals.circuits.bases import Basis, RotationSite, basis, random_rotation
from saelab.evals.circuits.patching import _Runner
from saelab.tasks import tokenize


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("r") / "m", live={(0, 0), (1, 0)})


def test_random_rotation_is_orthogonal_and_seeded():
    q = random_rotation(24, 3).double()
    assert torch.allclose(q @ q.T, torch.eye(24, dtype=torch.float64), atol=1e-6)
    assert torch.equal(random_rotation(24, 3), random_rotation(24, 3))
    assert not torch.allclose(random_rotation(24, 3), random_rotation(24, 4))
    assert (q - torch.eye(24)).abs().max() > 0.5  # not the neurons again


def test_rotation_has_the_neurons_sites_and_no_error_node(model):
    rot, neu = basis(model, "rotation"), basis(model, "neurons")
    assert rot.hooks == neu.hooks and len(rot) == len(neu)
    assert not rot.errors.any()


def test_rotation_reproduces_the_activation(model):
    tok = tokenize(TASK, model.tokenizer)
    site = basis(model, "rotation").sites[1]
    x = model.activations(tok.pos, [site.hook])[site.hook]
    (z,) = site.split(x)
    ref = x.double() @ site.q.double().T  # dense float64 coordinates
    assert torch.allclose(z.squeeze(-1).double(), ref, atol=1e-5)
    assert torch.allclose(site.lin([z]), x, atol=1e-5)
    # spliced in with nothing replaced, the run is the model's own
    keep = torch.zeros(len(site.names), dtype=torch.bool)
    logits = model.logits(tok.pos, {site.hook: lambda a: a + site.lin([site.split(a)[0] * keep[:, None]])})
    assert torch.allclose(logits, model.logits(tok.pos), atol=1e-4)


def test_patching_every_direction_is_patching_every_neuron(model):
    tok = tokenize(TASK, model.tokenizer)
    run = _Runner(model, tok, "logit-diff")
    ms = []
    for b in (basis(model, "rotation"), basis(model, "neurons")):
        src = Sources(run, b, "counterfactual")
        ms.append(run.run(tok.pos, patch_mask(b, src.source, torch.ones(len(b), dtype=torch.bool))))
    assert torch.allclose(ms[0], ms[1], atol=1e-4)


def test_rotation_attribution_equals_exact_patching_where_the_model_is_linear(model):
    tok = tokenize(TASK, model.tokenizer)
    d = model.model.cfg.d_model
    b = Basis("rotation", [RotationSite(LINEAR_HOOK, random_rotation(d, 0))])
    truth = exact(model, tok, b, progress=False).scores
    # linear after the site: patching every direction is the counterfactual run, so effects sum to 1
    assert math.isclose(float(truth.sum()), 1.0, abs_tol=FLOAT32_NOISE)
    for method in GRADIENT_METHODS:
        got = attribute(model, tok, b, method).scores
        assert torch.allclose(got, truth, atol=FLOAT32_NOISE * truth.abs().max()), method
