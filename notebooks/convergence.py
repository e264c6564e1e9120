# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Algorithm 1 on a random problem: convergence and rounding
#
# The paper proves that gradient descent on
# `L(M) = 1/2 ||f(M∘W) - f(W)||_F^2 + lam/2 ||M||_F^2` converges linearly (a Lipschitz gradient
# plus a Polyak-Lojasiewicz inequality). This notebook runs the solver on random `X`, `W`, plots
# `L(M_t) - L*` on a log scale, and rounds the mask. Paired with `convergence.py` by jupytext;
# edit either. Runs in well under a minute on a CPU.

# %%
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from jaxprune import binarize, measured_sparsity, solve_mask
from jaxprune.synthetic import SyntheticConfig, attention_error, make_problem

cfg = SyntheticConfig(n=32, d=16, batch=2, heldout=2)
x, x_heldout, w = make_problem(cfg)

# %% [markdown]
# Derived step size (`step_size=None`): `1/L` from power iteration on Hessian-vector products,
# with a guard that rejects any step that would raise the loss.

# %%
runs = {lam: solve_mask(w, x, lam=lam, steps=200, progress=False) for lam in (0.003, 0.03)}
longer = {lam: solve_mask(w, x, lam=lam, steps=600, progress=False) for lam in runs}

fig, ax = plt.subplots(figsize=(6, 4))
for lam, res in runs.items():
    gap = res.history["loss"] - longer[lam].final_loss
    ax.semilogy(np.maximum(gap, 1e-12), label=f"lambda = {lam}, eta = {res.step_size:.3g}")
ax.set_xlabel("iteration")
ax.set_ylabel("L(M_t) - L*")
ax.legend()
assert all(np.all(np.diff(r.history["loss"]) <= 0) for r in runs.values())

# %% [markdown]
# Rounding: keep the largest half of the relaxed mask, and compare the held-out attention error
# with keeping the largest half of `|W|`.

# %%
mask = runs[0.03].masks
for name, score in {"softmax-aware M": mask, "magnitude |W|": jnp.abs(w)}.items():
    keep = binarize(score, 0.5)
    err = float(attention_error(keep, w, x_heldout))
    print(f"{name:16s} sparsity {measured_sparsity(keep):.2f}  held-out attention error {err:.4f}")
