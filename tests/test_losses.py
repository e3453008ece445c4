"""Losses and metrics against hand-computed values (the definitions in REFERENCE-SEMANTICS.md)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.train.losses import dpo_loss, dpo_pair_losses, sft_loss

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


def run(loss_type, eps=0.0, **kw):
    loss, metrics = dpo_loss(jnp.asarray(POLICY), jnp.asarray(REF), jnp.asarray(LENGTHS), jnp.asarray(2),
                             beta=BETA, loss_type=loss_type, label_smoothing=eps, **kw)
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


def test_rpo_adds_token_mean_nll_of_chosen():
    loss0, _ = run("sigmoid")
    loss, m = run("sigmoid", sft_weight=0.5, chosen_nll_sum=jnp.asarray(30.0), chosen_tokens_total=jnp.asarray(9))
    assert m["nll_loss"] == pytest.approx(30.0 / 9)
    assert loss == pytest.approx(loss0 + 0.5 * 30.0 / 9, rel=1e-6)


@pytest.mark.parametrize("loss_type,expected", [("sigmoid", math.log(2)), ("hinge", 1.0), ("ipo", (1 / (2 * BETA)) ** 2),
                                                ("robust", math.log(2))])
def test_step_zero_policy_equals_reference(loss_type, expected):
    logps = jnp.asarray(POLICY)
    loss, m = dpo_loss(logps, logps, jnp.asarray(LENGTHS), jnp.asarray(2), beta=BETA, loss_type=loss_type)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(m["rewards/margins"]) == 0.0
    assert float(m["rewards/accuracies"]) == 0.0  # strict >: ties are not accurate


def test_pair_losses_reject_unknown_type():
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_pair_losses(jnp.zeros(1), jnp.zeros(1), BETA, "kto")


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
    loss, m = dpo_loss(jnp.asarray(POLICY), jnp.asarray(REF), jnp.asarray(LENGTHS), jnp.asarray(1), beta=BETA,
                       valid=jnp.asarray([True, False]))
    assert float(loss) == pytest.approx(-log_sigmoid(BETA * D[0]), rel=1e-6)
    assert float(m["rewards/chosen"]) == pytest.approx(BETA * DC[0], abs=1e-6)
    assert float(m["rewards/accuracies"]) == 1.0
