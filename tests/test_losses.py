"""Losses and metrics against hand-computed values (the definitions in REFERENCE-SEMANTICS.md)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.train.dpo import PreferenceLoss, dpo_loss, f_scores
from jaxalign.train.losses import sft_loss

BETA = 0.1


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


# Two pairs: policy and reference summed log-probs, chosen rows first.
POLICY = np.array([-10.0, -20.0, -14.0, -19.0], np.float32)  # chosen0, chosen1, rejected0, rejected1
REF = np.array([-12.0, -19.0, -13.0, -21.0], np.float32)
LENGTHS = np.array([4, 5, 2, 10], np.int32)
# Δc = [2, -1], Δr = [-1, 2], d = [3, -3]
DC, DR = np.array([2.0, -1.0]), np.array([-1.0, 2.0])
D = DC - DR


def spec(*types, weights=None, **kw):
    return PreferenceLoss(loss_types=types, loss_weights=weights or (1.0,) * len(types), beta=BETA, **kw)


def run(loss_type, eps=0.0, policy=POLICY, ref=REF, valid=None, **kw):
    loss, metrics = dpo_loss(jnp.asarray(policy), jnp.asarray(ref), jnp.asarray(LENGTHS), jnp.asarray(2),
                             spec(loss_type, label_smoothing=eps, **kw), valid=valid,
                             chosen_nll_sum=jnp.asarray(30.0), chosen_tokens_total=jnp.asarray(9))
    return float(loss), {k: float(v) for k, v in metrics.items()}


def test_sigmoid_loss_and_trl_metrics():
    loss, m = run("sigmoid")
    assert loss == pytest.approx(np.mean([-log_sigmoid(BETA * d) for d in D]), rel=1e-6)
    assert m["rewards/chosen"] == pytest.approx(BETA * DC.mean(), abs=1e-6)
    assert m["rewards/rejected"] == pytest.approx(BETA * DR.mean(), abs=1e-6)
    assert m["rewards/accuracies"] == pytest.approx(0.5)
    assert m["rewards/margins"] == pytest.approx(BETA * D.mean(), abs=1e-6)
    assert m["logps/chosen"] == pytest.approx(-15.0)
    assert m["logps/rejected"] == pytest.approx(-16.5)


def test_conservative_and_robust_with_label_smoothing():
    eps = 0.2
    loss, _ = run("sigmoid", eps)
    expected = np.mean([-(1 - eps) * log_sigmoid(BETA * d) - eps * log_sigmoid(-BETA * d) for d in D])
    assert loss == pytest.approx(expected, rel=1e-6)
    loss, _ = run("robust", eps)
    expected = np.mean([(-(1 - eps) * log_sigmoid(BETA * d) + eps * log_sigmoid(-BETA * d)) / (1 - 2 * eps)
                        for d in D])
    assert loss == pytest.approx(expected, rel=1e-6)


def test_hinge_and_ipo():
    loss, _ = run("hinge")
    assert loss == pytest.approx(np.mean([max(0.0, 1 - BETA * d) for d in D]), rel=1e-6)
    loss, m = run("ipo")
    # IPO uses log-ratios averaged over completion length; rewards still from summed log-probs.
    dbar = DC / LENGTHS[:2] - DR / LENGTHS[2:]
    assert loss == pytest.approx(np.mean((dbar - 1 / (2 * BETA)) ** 2), rel=1e-6)
    assert m["rewards/chosen"] == pytest.approx(BETA * DC.mean(), abs=1e-6)


def test_a_loss_list_is_the_weighted_sum_and_sft_is_the_token_mean_nll_of_chosen():
    loss0, _ = run("sigmoid")
    (loss, m), hinge = (dpo_loss(jnp.asarray(POLICY), jnp.asarray(REF), jnp.asarray(LENGTHS), jnp.asarray(2),
                                 spec("sigmoid", "sft", "hinge", weights=(1.0, 0.5, 2.0)),
                                 chosen_nll_sum=jnp.asarray(30.0), chosen_tokens_total=jnp.asarray(9)),
                        run("hinge")[0])
    assert float(m["nll_loss"]) == pytest.approx(30.0 / 9)
    assert float(loss) == pytest.approx(loss0 + 0.5 * 30.0 / 9 + 2.0 * hinge, rel=1e-6)


@pytest.mark.parametrize("loss_type,expected", [("sigmoid", math.log(2)), ("hinge", 1.0), ("ipo", (1 / (2 * BETA)) ** 2),
                                                ("robust", math.log(2))])
def test_step_zero_policy_equals_reference(loss_type, expected):
    logps = jnp.asarray(POLICY)
    loss, m = dpo_loss(logps, logps, jnp.asarray(LENGTHS), jnp.asarray(2), spec(loss_type))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(m["rewards/margins"]) == 0.0
    assert float(m["rewards/accuracies"]) == 0.0  # strict >: ties are not accurate


def test_unknown_loss_types_and_mismatched_weights_are_refused():
    with pytest.raises(ValueError, match="kto"):
        spec("kto")
    with pytest.raises(ValueError, match="weights"):
        PreferenceLoss(loss_types=("sigmoid", "sft"), loss_weights=(1.0,))


def test_sft_loss_is_a_token_level_mean_over_the_whole_batch():
    logp = jnp.asarray([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = jnp.asarray([[0, 1, 1], [1, 0, 0]])
    correct = jnp.asarray([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    lse = jnp.full((2, 3), 2.0)
    # This micro-batch holds 3 of the batch's 6 trained tokens: its share is sum / 6.
    loss, m = sft_loss(logp, lse, correct, mask, jnp.asarray(6))
    assert float(loss) == pytest.approx((2 + 3 + 4) / 6)
    assert float(m["mean_token_accuracy"]) == pytest.approx(1 / 6)
    loss_z, _ = sft_loss(logp, lse, correct, mask, jnp.asarray(6), z_loss=1e-2)
    assert float(loss_z) == pytest.approx((2 + 3 + 4) / 6 + 1e-2 * 3 * 4 / 6)


def test_padding_pairs_contribute_nothing():
    # Pair 1 is padding (an eval batch's tail): excluded from the loss and every metric.
    loss, m = dpo_loss(jnp.asarray(POLICY), jnp.asarray(REF), jnp.asarray(LENGTHS), jnp.asarray(1), spec("sigmoid"),
                       valid=jnp.asarray([True, False]))
    assert float(loss) == pytest.approx(-log_sigmoid(BETA * D[0]), rel=1e-6)
    assert float(m["rewards/chosen"]) == pytest.approx(BETA * DC[0], abs=1e-6)
    assert float(m["rewards/accuracies"]) == 1.0


def sig(x):
    return 1 / (1 + np.exp(-x))


def logsig(x):
    return -np.log1p(np.exp(-x))


CR, RR, Z = BETA * DC, BETA * DR, BETA * D
PC, PR, RC, RRf = POLICY[:2], POLICY[2:], REF[:2], REF[2:]
EPS = 0.1
# Each TRL 1.16 loss type by hand (trl/trainer/dpo_trainer.py `_compute_loss`), from the same two pairs.
BY_HAND = {
    "exo_pair": sig(Z) * (logsig(Z) - np.log(1 - EPS)) + sig(-Z) * (logsig(-Z) - np.log(EPS)),
    "nca_pair": -logsig(CR) - 0.5 * logsig(-CR) - 0.5 * logsig(-RR),
    "bco_pair": -logsig(CR) - logsig(-RR),
    "sppo_hard": (DC - 0.5 / BETA) ** 2 + (DR + 0.5 / BETA) ** 2,
    # sorted across the batch: policy (chosen - rejected) [4, -1] -> [-1, 4]; reference [1, 2]
    "aot": -(1 - EPS) * logsig(BETA * np.array([-2.0, 2.0])) - EPS * logsig(-BETA * np.array([-2.0, 2.0])),
    # sorted Δc [-1, 2] and Δr [-1, 2]: the differences are 0 (unsorted they would be ±3)
    "aot_unpaired": np.full(2, np.log(2)),
    "apo_zero": 1 - sig(CR) + sig(RR),
    "apo_down": sig(CR) + 1 - sig(BETA * (DC - DR)),
    "discopop": -logsig(Z) * (1 - sig(Z / 0.05)) + np.exp(-Z) * sig(Z / 0.05),
    "sigmoid_norm": -logsig(BETA * (DC / LENGTHS[:2] - DR / LENGTHS[2:])),
}


@pytest.mark.parametrize("loss_type", sorted(BY_HAND))
def test_every_trl_loss_type_by_hand(loss_type):
    loss, m = run(loss_type, EPS)
    assert loss == pytest.approx(float(np.mean(BY_HAND[loss_type])), rel=1e-5)
    assert m["rewards/margins"] == pytest.approx(BETA * D.mean(), abs=1e-6)  # rewards never change with the loss


@pytest.mark.parametrize("kind,f", [("forward_kl", lambda x: 1 - np.exp(-x)),
                                    ("js_divergence", lambda x: np.log(2) + logsig(x)),
                                    ("alpha_divergence", lambda x: (np.exp(-0.5 * x) - 1) / -0.5)])
def test_f_divergences_replace_the_log_ratios_in_the_losses_by_their_scores(kind, f):
    np.testing.assert_allclose(np.asarray(f_scores(jnp.asarray(DC, jnp.float32), kind, 0.5)), f(DC), rtol=1e-6)
    loss, m = run("sigmoid", f_divergence=kind)
    assert loss == pytest.approx(float(np.mean(-logsig(BETA * (f(DC) - f(DR))))), rel=1e-5)
    loss, _ = run("ipo", f_divergence=kind)
    assert loss == pytest.approx(float(np.mean((f(DC) / LENGTHS[:2] - f(DR) / LENGTHS[2:] - 5) ** 2)), rel=1e-5)
    assert m["rewards/chosen"] == pytest.approx(BETA * DC.mean(), abs=1e-6)
    # alpha = 1 is reverse KL
    np.testing.assert_array_equal(np.asarray(f_scores(jnp.asarray(DC), "alpha_divergence", 1.0)), DC)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_sorted_losses_sort_real_pairs_only(loss_type):
    """A padding pair (an eval tail, an empty packed slot) takes no place in the sort."""
    loss, m = run(loss_type, EPS, valid=jnp.asarray([True, False]))
    delta = (PC[0] - PR[0]) - (RC[0] - RRf[0]) if loss_type == "aot" else DC[0] - DR[0]
    # num_pairs stays 2 in `run`: the one real pair's loss is half the batch's
    assert loss == pytest.approx(float(-(1 - EPS) * logsig(BETA * delta) - EPS * logsig(-BETA * delta)) / 2, rel=1e-5)
    grad = jax.grad(lambda p: dpo_loss(p, jnp.asarray(REF), jnp.asarray(LENGTHS), jnp.asarray(1), spec(loss_type),
                                       valid=jnp.asarray([True, False]))[0])(jnp.asarray(POLICY))
    assert np.all(np.isfinite(np.asarray(grad))) and float(grad[1]) == 0.0 and float(grad[3]) == 0.0


def test_reference_free_simpo_and_orpo_by_hand():
    """CPO/SimPO/ORPO (TRL's CPOTrainer, ORPOTrainer): no reference, so the log-ratios are the policy's log-probs;
    rewards and logps/* are token means for the length-normalised losses, as those trainers log them."""
    free = dict(policy=POLICY, ref=np.zeros(4, np.float32), reference_free=True)
    mean_c, mean_r = PC / LENGTHS[:2], PR / LENGTHS[2:]
    loss, m = run("simpo", EPS, simpo_gamma=0.3, **free)
    z = BETA * (mean_c - mean_r) - 0.3
    assert loss == pytest.approx(float(np.mean(-(1 - EPS) * logsig(z) - EPS * logsig(-z))), rel=1e-5)
    assert m["rewards/chosen"] == pytest.approx(BETA * mean_c.mean(), rel=1e-5)
    assert m["logps/rejected"] == pytest.approx(mean_r.mean(), rel=1e-5)
    # ORPO: NLL - λ log σ(log odds ratio), log odds(y) = ℓ - log(1 - e^ℓ) of the token-mean log-prob ℓ; the NLL's
    # sum and count (prompt and chosen reply) come from the step
    (loss, m), nll = (dpo_loss(jnp.asarray(POLICY), jnp.zeros(4), jnp.asarray(LENGTHS), jnp.asarray(2),
                               spec("orpo", reference_free=True),
                               chosen_nll_sum=jnp.asarray(30.0), chosen_tokens_total=jnp.asarray(9)), 30.0 / 9)
    log_odds = (mean_c - mean_r) - (np.log1p(-np.exp(mean_c)) - np.log1p(-np.exp(mean_r)))
    assert float(loss) == pytest.approx(nll - BETA * float(np.mean(logsig(log_odds))), rel=1e-5)
    assert float(m["log_odds_chosen"]) == pytest.approx(float(log_odds.mean()), rel=1e-5)
    assert float(m["log_odds_ratio"]) == pytest.approx(float(np.mean(logsig(log_odds))), rel=1e-5)
    assert float(m["rewards/margins"]) == pytest.approx(BETA * float(np.mean(mean_c - mean_r)), rel=1e-5)
    # CPO: sigmoid on the policy's summed log-probs; rewards from the sums
    loss, m = run("sigmoid", **free)
    assert loss == pytest.approx(float(np.mean(-logsig(BETA * (PC - PR)))), rel=1e-5)
    assert m["rewards/chosen"] == pytest.approx(BETA * PC.mean(), rel=1e-5)


def test_wpo_pair_weights_scale_each_pairs_loss_and_the_sft_term_by_their_mean():
    """WPO: pair i's losses times w_i; the sft term (a batch term) times the mean weight, as TRL applies the
    weights to its expanded batch loss."""
    w = np.array([0.5, 0.2])
    loss, m = dpo_loss(jnp.asarray(POLICY), jnp.asarray(REF), jnp.asarray(LENGTHS), jnp.asarray(2),
                       spec("sigmoid", "sft", weights=(1.0, 0.5), use_weighting=True), pair_weights=jnp.asarray(w),
                       chosen_nll_sum=jnp.asarray(30.0), chosen_tokens_total=jnp.asarray(9))
    sigmoid = np.mean([-log_sigmoid(BETA * d) * wi for d, wi in zip(D, w)])
    assert float(loss) == pytest.approx(sigmoid + 0.5 * 30.0 / 9 * w.mean(), rel=1e-6)
    assert float(m["nll_loss"]) == pytest.approx(30.0 / 9) and float(m["rewards/margins"]) == pytest.approx(BETA * D.mean())
