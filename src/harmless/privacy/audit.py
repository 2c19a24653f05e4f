"""What an attacker who knows the model recovers from a privatised image.

The released ``x_hat = x + delta`` has ``delta`` in ``N(A)``, so the harmful part of the original,
``(I - P) x = (I - P) x_hat``, is public to anyone who knows the first linear layer. The attacks:

* ``min_norm``: ``(I - P) x_hat``, the minimum-norm point of ``x_hat + N(A)``;
* ``box``: the point of ``{x_hat + N(A)} ∩ [0, 1]^n`` nearest to the min-norm one;
* ``tv``: a total-variation prior: Adam on a smoothed TV of ``x_hat + U c`` (images with height and
  width) with a penalty for leaving ``[0, 1]``, finished by the exact projection onto
  ``{x_hat + N(A)} ∩ [0, 1]^n``;
* ``tv_lp``: the same prior solved exactly: the image of least anisotropic total variation in
  ``{x_hat + N(A)} ∩ [0, 1]^n``, a linear program (HiGHS through SciPy), made exactly feasible
  by the projection's repair step. Its optimum is global, so it is the attack to report;
  ``tv`` is the one that scales to images whose LP would be too large.

Each reconstruction lies in the set of images the model cannot tell apart from ``x``. That set
is the same for every harmless ``x_hat`` released for ``x``, so no choice of ``x_hat`` changes what
these attacks recover.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy import sparse
from scipy.optimize import linprog

from harmless.errors import InputError
from harmless.linalg.subspace import HarmlessSubspace
from harmless.privacy.core import Projector, _check_positive, _images, _project_flat, _repair, projector

__all__ = ["min_norm_attack", "box_attack", "tv_attack", "tv_lp_attack", "audit"]


def min_norm_attack(space: HarmlessSubspace | Projector, x_hat: torch.Tensor) -> torch.Tensor:
    """``(I - P) x_hat`` (may leave ``[0, 1]``)."""
    proj = projector(space)
    xh = _images(proj, x_hat, "x_hat", box=False)
    return proj.harmful(xh.reshape(xh.shape[0], -1)).reshape(xh.shape)


def box_attack(space: HarmlessSubspace | Projector, x_hat: torch.Tensor, *, max_iter: int = 100) -> torch.Tensor:
    """The nearest point to ``(I - P) x_hat`` in ``{x_hat + N(A)} ∩ [0, 1]^n`` (``x_hat`` in the box)."""
    proj = projector(space)
    xh = _images(proj, x_hat, "x_hat").reshape(-1, proj.n)
    _check_positive(max_iter, "max_iter", integer=True)
    y, _ = _project_flat(proj, xh, proj.harmful(xh), max_iter=max_iter)
    return y.reshape(-1, *proj.input_shape)


def _tv(y: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    dh = y[..., 1:, :-1] - y[..., :-1, :-1]
    dw = y[..., :-1, 1:] - y[..., :-1, :-1]
    return torch.sqrt(dh ** 2 + dw ** 2 + eps ** 2).flatten(1).sum(1)


def tv_attack(space: HarmlessSubspace | Projector, x_hat: torch.Tensor, *, steps: int = 200, lr: float = 0.02,
              penalty: float = 100.0, max_iter: int = 100,
              images: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Smoothed-TV minimisation over ``{x_hat + N(A)} ∩ [0, 1]^n`` (see the module docstring).

    ``images`` maps the batch to the images whose TV is minimised, e.g. :meth:`Tiling.merge
    <harmless.privacy.tiles.Tiling.merge>` when the batch holds the tiles of larger images, so that
    the prior also ties neighbouring tiles together; default: the batch itself."""
    proj = projector(space)
    if len(proj.input_shape) != 3:
        raise InputError(f"tv_attack needs image inputs (C, H, W), got input shape {proj.input_shape}")
    xh = _images(proj, x_hat, "x_hat")
    _check_positive(steps, "steps", integer=True)
    _check_positive(lr, "lr")
    _check_positive(penalty, "penalty")
    _check_positive(max_iter, "max_iter", integer=True)
    b = xh.shape[0]
    flat = xh.reshape(b, -1)
    start = proj.null @ (proj.harmful(flat) - flat).T  # coefficients of the min-norm point
    c = start.T.clone().requires_grad_(True)
    opt = torch.optim.Adam([c], lr=lr)
    for _ in range(int(steps)):
        opt.zero_grad()
        y = flat + c @ proj.null
        viol = (torch.relu(-y) ** 2 + torch.relu(y - 1.0) ** 2).sum(1)
        batch = y.reshape(b, *proj.input_shape)
        loss = _tv(batch if images is None else images(batch)).sum() + penalty * viol.sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        y = flat + c.detach() @ proj.null
        out, _ = _project_flat(proj, flat, y, max_iter=max_iter)
    return out.reshape(b, *proj.input_shape)


def _differences(shape: tuple[int, ...]) -> sparse.csr_matrix:
    """Forward differences along height and width, per channel, as a sparse ``(p, n)`` matrix."""
    idx = np.arange(int(np.prod(shape))).reshape(shape)
    pairs = [(idx[..., 1:, :], idx[..., :-1, :]), (idx[..., :, 1:], idx[..., :, :-1])]
    blocks = []
    for a, b in pairs:
        m = a.size
        rows = np.arange(m)
        blocks.append(sparse.csr_matrix((np.r_[np.ones(m), -np.ones(m)], (np.r_[rows, rows], np.r_[a.ravel(), b.ravel()])),
                                        shape=(m, idx.size)))
    return sparse.vstack(blocks).tocsr()


_TIGHT = {"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10, "ipm_optimality_tolerance": 1e-10}


def tv_lp_attack(space: HarmlessSubspace | Projector, x_hat: torch.Tensor, *, progress: bool = False) -> torch.Tensor:
    """The image of least anisotropic total variation ``sum |z_i - z_j|`` (horizontal and vertical
    neighbours, per channel) among all with the model's output on ``x_hat``, exactly:

        min 1.s  s.t.  -s <= D z <= s,  A z = A x_hat,  0 <= z <= 1,

    an LP per image solved by HiGHS (``scipy.optimize.linprog``: interior point with crossover at
    tolerances of 1e-10, else at HiGHS's defaults of 1e-7, else the dual simplex), then made
    exactly feasible by the repair of :func:`~harmless.privacy.core.project_affine_box`. About 3 s for a 28x28 image and 10 s for a 3x32x32 one on a 2-core machine."""
    from tqdm import tqdm

    proj = projector(space)
    if len(proj.input_shape) != 3:
        raise InputError(f"tv_lp_attack needs image inputs (C, H, W), got input shape {proj.input_shape}")
    xh = _images(proj, x_hat, "x_hat").reshape(-1, proj.n)
    n = proj.n
    diff = _differences(proj.input_shape)
    p = diff.shape[0]
    a = proj.matrix.numpy()
    a_sparse = sparse.csr_matrix(np.where(a != 0, a, 0.0))
    eye = sparse.identity(p, format="csr")
    a_ub = sparse.vstack([sparse.hstack([diff, -eye]), sparse.hstack([-diff, -eye])]).tocsr()
    a_eq = sparse.hstack([a_sparse, sparse.csr_matrix((a.shape[0], p))]).tocsr()
    cost = np.r_[np.zeros(n), np.ones(p)]
    bounds = np.c_[np.r_[np.zeros(n), np.zeros(p)], np.r_[np.ones(n), np.full(p, np.inf)]]
    out = []
    for k, row in enumerate(tqdm(xh, desc="tv-lp attack", unit="image", disable=not progress or None)):
        v = row.numpy()
        # tight tolerances first; HiGHS's interior point sometimes gives up on them (MNIST's
        # digits), and its defaults (1e-7) are then good enough: the repair below is exact. The
        # dual simplex, last, is slower (~10x) but the most robust
        for method, options in (("highs-ipm", _TIGHT), ("highs-ipm", {}), ("highs-ds", {})):
            res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(2 * p), A_eq=a_eq, b_eq=a @ v, bounds=bounds,
                          method=method, options=options)
            if res.status == 0:
                break
        if res.status != 0:  # the LP is feasible (x_hat itself) and bounded (TV >= 0): the solver failed
            raise RuntimeError(f"tv_lp_attack: HiGHS failed on image {k}: {res.message}")
        out.append(torch.from_numpy(res.x[:n]))
    # the LP's point is feasible to ~1e-13 and sits on faces of the box, where an interior-point
    # projection would only blur it by ~sqrt(mu): repair it in place instead
    exact, _ = _repair(proj, xh, torch.stack(out))
    return exact.reshape(-1, *proj.input_shape)


def audit(space: HarmlessSubspace | Projector, x: torch.Tensor, x_hat: torch.Tensor, *, lpips: bool = True,
          tv_steps: int = 200, tv_lp: bool = True) -> dict[str, dict[str, float]]:
    """Run every attack on ``x_hat``; return per attack the mean SSIM / PSNR / (LPIPS) of its
    reconstruction to the original ``x`` (reconstructions clipped to ``[0, 1]`` for the metrics),
    plus ``"released"``: the same for ``x_hat`` itself. ``tv_lp``: include the exact TV attack
    (an LP per image, seconds each)."""
    from harmless import metrics

    proj = projector(space)
    xs = _images(proj, x, "x")
    recs = {"released": _images(proj, x_hat, "x_hat"), "min_norm": min_norm_attack(proj, x_hat),
            "box": box_attack(proj, x_hat)}
    if len(proj.input_shape) == 3 and tv_steps > 0:
        recs["tv"] = tv_attack(proj, x_hat, steps=tv_steps)
    if len(proj.input_shape) == 3 and tv_lp:
        recs["tv_lp"] = tv_lp_attack(proj, x_hat)
    out: dict[str, dict[str, float]] = {}
    for name, rec in recs.items():
        r = rec.clamp(0.0, 1.0)
        row = {"ssim": float(metrics.ssim(r, xs).mean()), "psnr": float(metrics.psnr(r, xs).mean())}
        if lpips:
            row["lpips"] = float(metrics.lpips(r, xs).mean())
        out[name] = row
    return out
