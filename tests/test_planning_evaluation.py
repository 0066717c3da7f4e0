import math

import pytest
import torch

from conftest import tiny_model
from lightning_mka.errors import MKAError
from lightning_mka.evaluation import MMLUTally, continuation_logprobs, perplexity, shifted_token_nll
from lightning_mka.planning import candidate_pairs, choose_pair, merge_alpha, parse_alpha, resolve_target


def test_resolve_target():
    assert resolve_target(30, None, 0.3, 1, 1) == 21
    assert resolve_target(32, None, 0.4375, 1, 1) == 18
    assert resolve_target(30, 21, None, 1, 1) == 21
    with pytest.raises(MKAError, match="exactly one"):
        resolve_target(30, 21, 0.3, 1, 1)
    with pytest.raises(MKAError, match="target_layers=30 must be below"):
        resolve_target(30, 30, None, 1, 1)
    with pytest.raises(MKAError, match="unreachable with keep_first=5 and keep_last=5"):
        resolve_target(30, 10, None, 5, 5)


def test_candidates_respect_protected_layers_and_distance():
    assert candidate_pairs(6, 1, 1, 1) == [(1, 2), (2, 3), (3, 4)]
    assert (1, 3) in candidate_pairs(6, 2, 1, 1) and (1, 4) not in candidate_pairs(6, 2, 1, 1)
    assert candidate_pairs(6, 1, 0, 0)[0] == (0, 1) and candidate_pairs(6, 1, 0, 0)[-1] == (4, 5)


def test_choose_pair_and_alpha():
    sim = torch.eye(5, dtype=torch.float64)
    sim[2, 3] = sim[3, 2] = 0.9
    sim[1, 2] = sim[2, 1] = 0.5
    assert choose_pair(sim, candidate_pairs(5, 1, 1, 1)) == (2, 3, 0.9)
    assert merge_alpha("similarity", sim, 2, 3) == pytest.approx(0.9)
    sim[2, 3] = 0.999
    assert merge_alpha("similarity", sim, 2, 3) == 0.95  # clamped
    s_l, s_m = float(sim.mean(1)[2]), float(sim.mean(1)[3])
    assert merge_alpha("official", sim, 2, 3) == pytest.approx(1 / (1 + math.exp(-s_l / (s_l + s_m))))
    assert merge_alpha(0.25, sim, 2, 3) == 0.25
    assert parse_alpha("0.3") == 0.3
    with pytest.raises(MKAError, match="unknown alpha 'x'"):
        parse_alpha("x")


def test_shifted_nll_pairs_logits_with_next_token():
    # logits that put all mass on the NEXT token give zero NLL; unshifted pairing would not
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    logits = torch.full((1, 5, 8), -1e4)
    for t in range(4):
        logits[0, t, ids[0, t + 1]] = 0.0
    nll, count, preds = shifted_token_nll(logits, ids)
    assert count == 4 and float(nll) == pytest.approx(0.0, abs=1e-6)
    assert preds.tolist() == [[1, 4, 1, 5]]
    uniform = torch.zeros(1, 5, 8)
    assert perplexity(float(shifted_token_nll(uniform, ids)[0]), 4) == pytest.approx(8.0)


def test_continuation_logprobs_single_and_multi_token_agree():
    model = tiny_model("llama", layers=2)
    context = [5, 6, 7, 8]
    single = continuation_logprobs(model, context, [[9], [10], [11]])
    multi = continuation_logprobs(model, context, [[9], [10, 12], [11]])
    assert torch.allclose(single[[0, 2]], multi[[0, 2]], atol=1e-5)
    with torch.no_grad():
        logp = model(torch.tensor([context + [10, 12]])).logits.log_softmax(-1)[0]
    assert float(multi[1]) == pytest.approx(float(logp[3, 10] + logp[4, 12]), abs=1e-5)


def test_mmlu_tally_micro_and_macro():
    tally = MMLUTally(2)
    for topic, correct in [(0, True), (0, True), (0, False), (0, False), (1, True)]:
        tally.count(topic)
        tally.add("letter", topic, correct)
    summary = tally.summary()
    assert summary["mmlu_letter_acc"] == pytest.approx(3 / 5)
    assert summary["mmlu_letter_acc_macro"] == pytest.approx((0.5 + 1.0) / 2)
    assert summary["mmlu_questions"] == 5


def test_continuation_logprobs_match_plain_forward_for_every_architecture():
    from conftest import ARCHITECTURES

    for kind in ARCHITECTURES:
        model = tiny_model(kind, layers=3)
        context = [5, 6, 7, 8, 9, 10]
        choices = [[11, 12, 13], [14], [15, 16]]
        scores = continuation_logprobs(model, context, choices)
        for i, c in enumerate(choices):
            with torch.no_grad():
                logp = model(torch.tensor([context + c])).logits.log_softmax(-1)[0]
            expected = sum(float(logp[len(context) - 1 + j, tok]) for j, tok in enumerate(c))
            assert float(scores[i]) == pytest.approx(expected, abs=1e-4), kind
