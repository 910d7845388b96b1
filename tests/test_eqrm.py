"""EQRM's pieces beyond DomainBed's vectors (tests/test_domainbed_updates.py):
the quantile's bisection and the burn-in that DomainBed's search draws."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from fishr_jax.algorithms import eqrm
from fishr_jax.algorithms import settings


def test_kde_quantile_is_where_the_density_reaches_q(x64):
  risks = jnp.asarray([0.31, 0.52, 0.47, 0.9])
  bandwidth = 1.06 * np.std(np.asarray(risks), ddof=1) * 4**-0.2
  for q in (0.5, 0.75, 0.99):
    k = float(eqrm.kde_quantile(risks, q))
    cdf = stats.norm.cdf((k - np.asarray(risks)) / bandwidth).mean()
    np.testing.assert_allclose(cdf, q, atol=1e-8)
  # Its gradient flows to the risks and sums to 1 (a shift moves it along).
  grad = jax.grad(eqrm.kde_quantile)(risks, 0.75)
  np.testing.assert_allclose(float(grad.sum()), 1.0, rtol=1e-6)


def test_a_drawn_burn_in_switches_the_loss_but_keeps_the_optimizer():
  """DomainBed resets to the eqrm_lr Adam only at update_count ==
  eqrm_burnin_iters, which a drawn float never equals."""
  drawn, _ = settings.from_domainbed("eqrm", {
      "eqrm_quantile": 0.8, "eqrm_burnin_iters": 1117.89, "eqrm_lr": 1e-6})
  assert (drawn.burnin_iters, drawn.switch_optimizer) == (1118, False)
  default, _ = settings.from_domainbed("eqrm", {
      "eqrm_quantile": 0.75, "eqrm_burnin_iters": 2500, "eqrm_lr": 1e-6})
  assert (default.burnin_iters, default.switch_optimizer) == (2500, True)
