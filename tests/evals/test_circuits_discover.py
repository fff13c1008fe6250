"""SAE-code circuit discovery: scoring on hand-built codes, ROC AUC against a direct pairwise
count, the end-to-end run and report on a tiny model, published head sets, and bad input."""

import json
import math

import pytest
import torch
from test_circuits_patching import tiny_model

from saelab.errors import SaelabError
from saelab.evals.circuits import DiscoverConfig, discover, headline, published, scoring, write_report
from saelab.evals.circuits.codes import code_vectors, codes, head_gradients, head_outputs, train_sae
from saelab.evals.circuits.discover import _trial_task
from saelab.evals.circuits.patching import edge_mask
from saelab.tasks import GENERATORS, Task, capacity


def test_node_counts_hand_built():
    # 3 heads; head 1 takes codes on positives never seen on negatives, head 0 shares them all,
    # head 2 has one unique code
    pos = torch.tensor([[1, 5, 7], [2, 6, 7], [1, 8, 9]])
    neg = torch.tensor([[1, 0, 7], [2, 0, 8], [3, 0, 7]])
    counts = scoring.node_counts(pos, neg)
    assert counts.tolist() == [0, 3, 1]
    assert counts.argmax() == 1
    s = scoring.softmax_scores(counts)
    assert torch.allclose(s.sum(), torch.tensor(1.0)) and s.argmax() == 1
    assert scoring.predicted(counts).tolist() == [False, True, False]  # mean count 4/3


def test_edge_counts_are_pairs_not_heads():
    # heads 0 (layer 0) and 1, 2 (layer 1), one head per layer slot: grid 2 layers x ... use
    # a mask by hand. Each head alone has the same codes on positives and negatives, but the
    # pair (0, 1) combines them differently on positives: an edge score a node score cannot see.
    pos = torch.tensor([[1, 2, 4], [3, 5, 4]])
    neg = torch.tensor([[1, 5, 4], [3, 2, 4]])
    assert scoring.node_counts(pos, neg).tolist() == [0, 0, 0]
    mask = torch.tensor([[False, True, True], [False, False, False], [False, False, False]])
    e = scoring.edge_counts(pos, neg, mask, n_codes=10)
    assert e[0, 1] == 2 and e[0, 2] == 0
    assert torch.isnan(e[~mask]).all()


def _pairwise_auc(scores, labels):
    p, n = scores[labels], scores[~labels]
    wins = (p[:, None] > n[None, :]).double() + 0.5 * (p[:, None] == n[None, :]).double()
    return wins.mean().item()


def test_roc_auc_matches_direct_pairwise_count():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.randint(0, 6, (40,), generator=g).float()  # many ties
        labels = torch.rand(40, generator=g) < 0.3
        assert scoring.roc_auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels))
    assert scoring.roc_auc(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([True, False, False])) == 1.0
    assert math.isnan(scoring.roc_auc(torch.ones(3), torch.ones(3, dtype=torch.bool)))
    fpr, tpr = scoring.roc_curve(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([True, False, True]))
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    # the curve's trapezoid area is the AUC
    area = sum((fpr[i + 1] - fpr[i]) * (tpr[i + 1] + tpr[i]) / 2 for i in range(len(fpr) - 1))
    assert area == pytest.approx(scoring.roc_auc(torch.tensor([3.0, 2.0, 1.0]),
                                                 torch.tensor([True, False, True])))


def test_precision_recall_f1_is_true_f1():
    pred = torch.tensor([True, True, False, False, True])
    truth = torch.tensor([True, False, True, False, False])
    prf = scoring.precision_recall_f1(pred, truth)
    assert prf["precision"] == pytest.approx(1 / 3) and prf["recall"] == pytest.approx(1 / 2)
    assert prf["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))


def test_topk_sae_code_is_argmax_and_separates_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=g) * 3
    x = centers.repeat_interleave(10, 0) + 0.05 * torch.randn(40, 8, generator=g)
    for kind in ("topk", "relu"):
        sae = train_sae(x, kind, n_latents=16, epochs=300, lr=1e-2, seed=0)
        c = codes(sae, x.reshape(40, 1, 8)).flatten()
        assert torch.equal(c, sae.pre_acts(x / sae.input_scale).argmax(1))
        groups = [set(c[i * 10:(i + 1) * 10].tolist()) for i in range(4)]
        # each cluster gets codes no other cluster uses
        for i in range(4):
            assert not groups[i] & set().union(*(groups[j] for j in range(4) if j != i))


def test_relu_circuit_sae_dense_step_matches_the_sparse_path():
    """train_sae's relu step uses dense products; the SAE's own sparse encode/decode (threshold
    selection, index lists) with the same penalty must train it to the same weights."""
    from saelab.penalty import l1_penalty
    from saelab.sae_init import init_sae

    x = torch.randn(60, 8, generator=torch.Generator().manual_seed(3))
    fast = train_sae(x, "relu", n_latents=12, l1=0.05, epochs=20, lr=1e-2, seed=0)
    ref = train_sae(x, "relu", n_latents=12, epochs=1, lr=1e-2, seed=0)  # same config and scale
    xs = x / ref.input_scale
    init_sae(ref, xs, 0)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for _ in range(20):
        idx, vals = ref.encode(xs)
        loss = (xs - ref.decode(idx, vals)).pow(2).sum(1).mean() + 0.05 * l1_penalty(ref, xs, idx, vals)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ref.normalize_decoder()
    for name, p in fast.state_dict().items():
        torch.testing.assert_close(p, ref.state_dict()[name], rtol=1e-4, atol=1e-5)


def test_head_outputs_mean_and_last_against_each_prompt_alone(tmp_path):
    """Padded batch vs each prompt run alone at its own length: the mean over real positions and
    the last real position, per head."""
    from saelab.evals.circuits.codes import head_outputs
    from saelab.evals.circuits.patching import result_hook

    model = tiny_model(tmp_path / "m", live={(0, 1), (1, 0)}, seed=2)
    tokens = torch.randint(0, 200, (3, 7), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([7, 4, 5])
    got = {pos: head_outputs(model, tokens, lengths, 2, 2, pos) for pos in ("mean", "last")}
    for i, n in enumerate(lengths.tolist()):
        acts = model.activations(tokens[i:i + 1, :n], [result_hook(0), result_hook(1)])
        per_head = torch.cat([acts[result_hook(layer)][0].reshape(n, 2, -1) for layer in (0, 1)], 1)
        torch.testing.assert_close(got["mean"][i], per_head.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["last"][i], per_head[-1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got["mean"], got["last"])
    with pytest.raises(SaelabError, match="position"):
        head_outputs(model, tokens, lengths, 2, 2, "first")


PROMPTS = [f"{a}bcd" for a in "aeimquy"]
COUNTERFACTUALS = [f"{a}bcd" for a in "fjnrvzo"]


def test_discover_end_to_end(tmp_path):
    model = tiny_model(tmp_path / "m", live={(0, 1), (1, 0)}, seed=1)
    tokens = [{"prompt": p, "counterfactual": c, "answer": "e", "wrong": "f"}
              for p, c in zip(PROMPTS, COUNTERFACTUALS, strict=True)]
    f = tmp_path / "copy.jsonl"
    f.write_text("\n".join(json.dumps(t) for t in tokens))
    cfg = DiscoverConfig(train_prompts=3, prompts=4, trials=3, n_latents=8, epochs=50)
    r = discover(model, task_file=str(f), config=cfg, progress=False)
    assert r.task == "copy" and r.node_counts.shape == (3, 4) and r.edge_counts.shape == (3, 4, 4)
    assert not r.truth.nodes[[0, 3]].any() and r.truth.nodes[[1, 2]].any()  # dead heads out
    assert len(r.node_auc) == 3 and all(0 <= a <= 1 for a in r.node_auc)
    assert r.passes == [2 * 7] * 3  # every trial's prompts and counterfactuals, nothing else
    s = r.summary()
    assert set(s) >= {"node_roc_auc", "edge_roc_auc", "node_precision_recall_f1",
                      "patching_edge_forward_passes", "method_forward_passes_per_trial"}
    paths = write_report(r, tmp_path / "out")
    data = json.loads(paths[0].read_text())
    assert data["node_roc_auc"]["mean"] == pytest.approx(sum(r.node_auc) / 3)
    assert all(p.stat().st_size > 0 for p in paths)
    assert paths[2].read_bytes()[:4] == b"\x89PNG"
    gt = s["ground_truth"]
    assert gt["stability"]["sets"] == 3 and gt["stability"]["prompts_per_set"] == 2  # 7 // 3
    assert s["in_headline"] == gt["stability"]["stable"]
    assert set(gt["node_effect_se"]) == set(gt["node_effect"]) and gt["metric"] == "logit-diff"
    md = (tmp_path / "out" / "circuits.md").read_text()
    assert "ground-truth stability" in md and "+- SE over prompts" in md
    with pytest.raises(SaelabError, match=r"task 'copy' has only 7 rows whose prompts and "
                       r"counterfactuals are distinct texts; train_prompts \+ prompts = 3 \+ 8 = 11"):
        discover(model, task_file=str(f), config=DiscoverConfig(train_prompts=3, prompts=8),
                 progress=False)


@pytest.mark.parametrize("name", list(GENERATORS))
def test_trial_training_and_held_out_texts_are_disjoint(name):
    """Every task, the default sizes (greater-than's 112 counterfactual texts used to repeat 5-12
    training counterfactuals in every 100 held-out ones): no prompt or counterfactual text of a
    trial's training rows occurs among its held-out rows."""
    cfg = DiscoverConfig()
    for trial in range(3):
        rows = _trial_task(name, None, cfg.train_prompts + cfg.prompts, trial, cfg.seed)
        train = rows.subset(range(cfg.train_prompts))
        held = rows.subset(range(cfg.train_prompts, len(rows)))
        assert len(held) == cfg.prompts
        assert not set(train.prompts + train.counterfactuals) & set(held.prompts + held.counterfactuals)


def test_task_file_trials_skip_repeated_texts():
    rows = [(f"p{i % 5}", f"c{i % 3}" if i < 6 else f"c{i}") for i in range(12)]
    fixed = Task("mine", *zip(*rows, strict=True), ((" a",),) * 12, ((" b",),) * 12)
    # file order: p0/c0, p1/c1, p2/c2 kept; p3/c0, p4/c1, p0/c2 repeat a counterfactual; p1/c6,
    # p2/c7 repeat a prompt; p3/c8, p4/c9 kept; p0/c10, p1/c11 repeat a prompt
    assert capacity(fixed) == 5
    for trial in range(4):
        t = _trial_task("mine", fixed, 5, trial, 0)
        assert len(set(t.prompts + t.counterfactuals)) == 10
    with pytest.raises(SaelabError, match="task 'mine' has only 5 rows"):
        _trial_task("mine", fixed, 6, 0, 0)


def test_impossible_sizes_are_one_line_before_the_model_loads():
    for cfg, message in (
        (DiscoverConfig(train_prompts=50, prompts=100),
         r"task 'greater-than' can make only 112 rows whose prompts and counterfactuals are "
         r"distinct texts; train_prompts \+ prompts = 50 \+ 100 = 150 must not exceed it"),
        (DiscoverConfig(truth_prompts=4000),
         r"task 'greater-than' can make only 10,864 rows whose prompts are distinct texts; "
         r"truth_prompts x truth_sets = 4000 x 3 = 12,000"),
    ):
        with pytest.raises(SaelabError, match=message) as e:
            discover("zoo:no-such-model", "greater-than", config=cfg, progress=False)
        assert "\n" not in str(e.value)
    with pytest.raises(SaelabError, match="unknown task metric 'kl'"):
        DiscoverConfig(metric="kl")


def test_bad_input():
    with pytest.raises(SaelabError, match="unknown task 'nope'"):
        discover("zoo:does-not-matter", "nope")
    with pytest.raises(SaelabError, match="unknown circuit SAE 'gated'"):
        DiscoverConfig(sae="gated")
    with pytest.raises(SaelabError, match="must be positive"):
        DiscoverConfig(trials=0)


def test_published_head_sets():
    c = published.circuits()
    assert {k: len(v["heads"]) for k, v in c.items()} == {
        "gpt2/ioi": 26, "gpt2/greater-than": 9, "attn-only-4l/docstring": 6}
    for v in c.values():
        assert v["source"] and v["differences"]
        mask = published.head_mask(v, v["n_layers"], v["n_heads"])
        assert mask.sum() == len(set(v["heads"]))
    assert published.lookup("gpt2", "ioi")["task"] == "ioi"
    assert published.lookup("zoo:tasks-4l", "ioi") is None
    with pytest.raises(SaelabError, match="12x12 head grid"):
        published.head_mask(c["gpt2/ioi"], 4, 8)
    assert edge_mask(2, 2).sum() == 4


def test_headline_leaves_unstable_tasks_out():
    def summary(task, stable, auc):
        return {"task": task, "in_headline": stable, "node_roc_auc": {"mean": auc, "std": 0.0}}

    h = headline([summary("ioi", True, 0.9), summary("greater-than", False, 0.5),
                  summary("docstring", True, 0.7)])
    assert h["mean"] == pytest.approx(0.8) and h["tasks"] == ["ioi", "docstring"]
    assert h["excluded"] == ["greater-than"]
    assert headline([summary("x", False, 0.5)])["mean"] is None


def test_change_and_relevance_scores_hand_computed():
    # 2 prompts, 2 positions, 2 heads, d = 2
    pos = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]], [[0.0, 0.0], [1.0, 1.0]]],
                        [[[3.0, 4.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    cf = torch.zeros_like(pos)
    grads = torch.tensor([[[[1.0, 1.0], [1.0, -1.0]], [[5.0, 5.0], [2.0, 0.0]]],
                          [[[-1.0, 0.0], [9.0, 9.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    # change: prompt 0: head 0 1 + 0, head 1 2 + sqrt 2; prompt 1: head 0 5, head 1 0
    assert scoring.code_change(pos, cf).tolist() == pytest.approx([(1 + 5) / 2, (2 + 2 ** 0.5) / 2])
    # relevance: prompt 0: head 0 |1 + 0|, head 1 |-2 + 2|; prompt 1: head 0 |-3|, head 1 0
    assert scoring.relevance(pos, cf, grads).tolist() == pytest.approx([2.0, 0.0])
    # the last-position form (P, N, d) is the one-position case
    assert scoring.relevance(pos[:, 0], cf[:, 0], grads[:, 0]).tolist() == pytest.approx([2.0, 1.0])
    mask = edge_mask(2, 1)
    e = scoring.edge_products(torch.tensor([2.0, 3.0]), mask)
    assert e[0, 1] == 6.0 and e[mask].numel() == 1 and torch.isnan(e[~mask]).all()


def test_edge_relevance_hand_computed():
    # 1 prompt, 2 positions, heads 0 (layer 0) -> 1, 2 (layer 1); d = 2
    vec_pos = torch.tensor([[[[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
                             [[0.0, 2.0], [0.0, 0.0], [0.0, 0.0]]]])
    inputs = torch.tensor([[[[9.0, 9.0], [3.0, 1.0], [1.0, 0.0]],
                            [[9.0, 9.0], [0.0, 1.0], [0.0, -0.5]]]])
    mask = torch.tensor([[False, True, True], [False, False, False], [False, False, False]])
    e = scoring.edge_relevance(vec_pos, torch.zeros_like(vec_pos), inputs, mask)
    # 0 -> 1: 1 * 3 + 2 * 1 = 5; 0 -> 2: |1 * 1 + 2 * -0.5| = 0: the two positions cancel
    assert e[0, 1] == pytest.approx(5.0) and e[0, 2] == pytest.approx(0.0)
    assert torch.isnan(e[~mask]).all()
    last = scoring.edge_relevance(vec_pos[:, 1], torch.zeros_like(vec_pos[:, 1]), inputs[:, 1], mask)
    assert last[0, 1] == pytest.approx(2.0) and last[0, 2] == pytest.approx(1.0)


def test_receiver_gradients_match_path_patching_finite_differences(tmp_path):
    """Every head live: sender s's output change, scaled by eps and path-patched into the
    receiver's layer input (patching.py's edge construction), moves the metric through
    receiver r alone by eps * (s's change . r's input gradient), summed over positions."""
    from saelab.evals.circuits.patching import _set_head, z_hook
    from saelab.tasks import last_logits, logit_diff, tokenize

    model = tiny_model(tmp_path / "m", live={(0, 0), (0, 1), (1, 0), (1, 1)}, seed=3)
    task = Task("copy", ("abcd", "qbcd"), ("xbcd", "zbcd"), (("e",), ("e",)), (("f",), ("f",)))
    tok = tokenize(task, model.tokenizer, model.context_length)
    got = head_gradients(model, tok, "logit-diff", 2, 2, "all", receivers=True, batch=1)
    assert got.inputs.shape == (2, tok.pos.shape[1], 4, 16) and got.local_backward_passes == 2
    assert (got.inputs[:, :, :2] == 0).all()  # layer 0 receives from no head
    delta = head_outputs(model, tok.cf, tok.cf_len, 2, 2, "all") - got.outputs
    eps = 1e-3
    for prompt, sender, receiver in ((0, 0, 2), (0, 1, 3), (1, 1, 2)):
        row = tok.rows(torch.tensor([prompt]))
        clean = float(logit_diff(last_logits(model.logits(row.pos), row.pos_len), row)[0])

        def path_patched(sign, s=sender, r=receiver, p=prompt, row=row, clean=clean):
            add = {"blocks.1.hook_resid_pre": lambda x: x + sign * eps * delta[p:p + 1, :, s]}
            z = {}
            model.logits(row.pos, {**add, z_hook(1): lambda x: z.setdefault("z", x.clone())})
            logits = model.logits(row.pos, {z_hook(1): _set_head(r - 2, 8, z["z"])})
            return float(logit_diff(last_logits(logits, row.pos_len), row)[0]) - clean

        fd = (path_patched(1) - path_patched(-1)) / (2 * eps)
        want = float((delta[prompt, :, sender] * got.inputs[prompt, :, receiver]).sum())
        assert want == pytest.approx(fd, rel=2e-2, abs=1e-3)
        assert abs(fd) > 1e-3  # a live edge: the check is not 0 == 0
    torch.testing.assert_close(got.outputs, head_outputs(model, tok.pos, tok.pos_len, 2, 2, "all"))


def test_code_vectors_are_what_the_code_writes():
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(1)) * 4
    for kind in ("relu", "topk"):
        sae = train_sae(x, kind, n_latents=10, epochs=30, lr=1e-2, seed=0)
        pre = (x / sae.input_scale - sae.b_dec) @ sae.W_enc.T + sae.b_enc
        top = torch.zeros_like(pre).scatter(1, pre.argmax(1, keepdim=True),
                                            pre.max(1, keepdim=True).values.relu())
        act = torch.relu(pre) if kind == "relu" else top
        want = (act @ sae.W_dec) * sae.input_scale
        got = code_vectors(sae, x.reshape(5, 6, 6))
        torch.testing.assert_close(got.reshape(30, 6), want.detach(), rtol=1e-4, atol=1e-4)


def test_metric_gradients_match_finite_differences(tmp_path):
    """d(logit difference)/d(head output) at every position, against nudging that head's
    `hook_result` slice by +-eps in one direction and rerunning the model."""
    from saelab.evals.circuits.patching import result_hook
    from saelab.tasks import last_logits, logit_diff, tokenize

    model = tiny_model(tmp_path / "m", live={(0, 1), (1, 0)}, seed=2)
    task = Task("copy", ("abcd", "qbc"), ("xbcd", "zbc"), (("e",), ("e",)), (("f",), ("f",)))
    tok = tokenize(task, model.tokenizer, model.context_length)
    got = head_gradients(model, tok, "logit-diff", 2, 2, "all", batch=1)
    outs, grads = got.outputs, got.grads
    assert got.inputs is None and got.local_backward_passes == 0
    assert outs.shape == grads.shape == (2, tok.pos.shape[1], 4, 16)
    assert (grads[1, int(tok.pos_len[1]):] == 0).all()  # padding
    direction = torch.randn(16, generator=torch.Generator().manual_seed(0))
    eps = 1e-3
    for prompt, t, head in ((0, 1, 1), (0, 3, 2), (1, 2, 1)):
        layer, h = divmod(head, 2)

        def nudge(sign, layer=layer, h=h, t=t, prompt=prompt):
            def fn(x):
                x = x.clone()
                x[:, t, h * 16:(h + 1) * 16] += sign * eps * direction.to(x.dtype)  # (B, T, H*d)
                return x
            row = tok.rows(torch.tensor([prompt]))
            logits = model.logits(row.pos, {result_hook(layer): fn})
            return float(logit_diff(last_logits(logits, row.pos_len), row)[0])

        fd = (nudge(1) - nudge(-1)) / (2 * eps)
        assert float(grads[prompt, t, head] @ direction) == pytest.approx(fd, rel=1e-2, abs=1e-3)
    torch.testing.assert_close(outs, head_outputs(model, tok.pos, tok.pos_len, 2, 2, "all"))


def test_change_and_relevance_discover_end_to_end(tmp_path):
    model = tiny_model(tmp_path / "m", live={(0, 1), (1, 0)}, seed=1)
    f = tmp_path / "copy.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": p, "counterfactual": c, "answer": "e", "wrong": "f"})
                           for p, c in zip(PROMPTS, COUNTERFACTUALS, strict=True)))
    for score, position in (("relevance", "all"), ("change", "last")):
        cfg = DiscoverConfig(train_prompts=3, prompts=4, trials=2, n_latents=8, epochs=20,
                             score=score, position=position, truth_sets=1)
        r = discover(model, task_file=str(f), config=cfg, progress=False)
        assert r.node_counts.shape == (2, 4) and (r.node_counts >= 0).all()
        assert r.node_counts[:, [0, 3]].abs().max() < 1e-6  # dead heads do not change
        assert r.backward_passes == [7 * (score == "relevance")] * 2
        assert r.summary()["method_backward_passes_per_trial"] == 7 * (score == "relevance")
        em = edge_mask(2, 2)
        node = r.node_counts[0]
        if score == "change":
            torch.testing.assert_close(r.edge_counts[0][em], (node[:, None] * node[None])[em])
        else:  # routed: only the live edge 0.1 -> 1.0 carries anything
            assert r.edge_counts[:, 1, 2].min() > 0 and r.edge_counts[:, em].max(1).values.eq(
                r.edge_counts[:, 1, 2]).all()
            assert r.local_backward_passes == [7 * 2] * 2  # 7 prompts x 2 heads above layer 0


def test_score_and_position_must_fit():
    for score, position in (("unique", "all"), ("change", "mean"), ("relevance", "mean")):
        with pytest.raises(SaelabError, match=f"position {position} does not go with score {score}"):
            DiscoverConfig(score=score, position=position)
    with pytest.raises(SaelabError, match="unknown score 'best'"):
        DiscoverConfig(score="best")
    for score, edge in (("change", "routed"), ("unique", "routed"), ("unique", "product")):
        with pytest.raises(SaelabError, match=f"edge score {edge} does not go with score {score}"):
            DiscoverConfig(score=score, edge_score=edge)
    with pytest.raises(SaelabError, match="unknown edge score 'pairs'; use routed or product"):
        DiscoverConfig(edge_score="pairs")
    assert [DiscoverConfig(score=s).edge_by for s in ("relevance", "change", "unique")] == [
        "routed", "product", "pairs"]
    assert DiscoverConfig(edge_score="product").edge_by == "product"


def test_position_all_refuses_unequal_lengths_before_the_ground_truth(tmp_path, monkeypatch):
    import importlib

    model = tiny_model(tmp_path / "m", live={(0, 1), (1, 0)}, seed=1)
    longer = Task("long", tuple(PROMPTS), tuple(c + "d" for c in COUNTERFACTUALS),
                  (("e",),) * len(PROMPTS), (("f",),) * len(PROMPTS))
    disc = importlib.import_module("saelab.evals.circuits.discover")

    def no_truth(*args, **kw):
        raise AssertionError("the ground truth ran")

    monkeypatch.setattr(disc, "ground_truth_sets", no_truth)
    cfg = DiscoverConfig(train_prompts=3, prompts=4, trials=1, ablation="mean")  # relevance, all
    with pytest.raises(SaelabError) as e:
        discover(model, longer, config=cfg, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "differ in length" in msg and "--score unique --position last" in msg
    unique = DiscoverConfig(train_prompts=3, prompts=4, trials=1, ablation="mean", score="unique",
                            n_latents=8, epochs=5, truth_sets=1, edges=False)
    monkeypatch.undo()
    assert discover(model, longer, config=unique, progress=False).node_counts.shape == (1, 4)
