"""Privacy protection with harmless perturbations (Chen et al., AAAI 2025, Algorithm 1).

A sensitive image ``x`` is replaced by ``x_hat = x + delta`` with ``delta`` in the harmless
subspace ``N(A)`` of the model's linear prefix ``A``: the model's output on ``x_hat`` equals
its output on ``x`` exactly, while ``x_hat`` should look unlike ``x``.

Everything here works in float64 with a dense factorisation of ``A`` (inputs of a few
thousand pixels: MNIST, CIFAR-10). The feasible set of a privatised image is

    C(x) = {x + U c} ∩ [0, 1]^n,   U an orthonormal basis of N(A),

an affine subspace intersected with the pixel box. :func:`project_affine_box` computes the
exact Euclidean projection of a target onto ``C(x)`` (a strictly convex QP) by accelerated
projected-gradient ascent on its dual, and always returns a point that is exactly feasible
up to float64 rounding: the last iterate is projected onto the affine set and then shrunk
towards ``x`` (which lies in the box) just enough to be inside the box again. The duality gap
of that point is reported as the certificate of optimality.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from harmless.errors import InputError, NoHarmlessSubspaceError
from harmless.linalg.subspace import HarmlessSubspace

__all__ = [
    "Projector", "ProjectionInfo", "Result", "projector", "project_affine_box", "privatize_paper",
    "privatize_decoy", "make_decoy", "quantize_harmless", "QuantizeResult", "box_violation",
]


# ---------------------------------------------------------------------------------------------
# The dense factorisation of the linear prefix.


class Projector:
    """Dense orthonormal bases of ``N(A)`` (``null``, ``(d, n)``) and of its complement, the row
    space (``row``, ``(r, n)``), plus ``A`` itself (``(m, n)``), all float64 on the CPU.

    ``harmful(v)`` = ``(I - P) v`` and ``harmless(v)`` = ``P v`` for flat batches ``(B, n)``;
    whichever basis is smaller is used.
    """

    def __init__(self, space: HarmlessSubspace) -> None:
        if not isinstance(space, HarmlessSubspace):
            raise InputError(f"space must be a HarmlessSubspace, got {type(space).__name__}")
        self.space = space
        self.input_shape: tuple[int, ...] = tuple(space.input_shape)
        self.n = int(space.ambient_dim)
        dense = space.operator.to_dense()
        a = torch.as_tensor(dense).detach().to(dtype=torch.float64, device="cpu").reshape(-1, self.n)
        self.matrix = a
        rank = int(space.rank)
        if rank >= self.n:
            raise NoHarmlessSubspaceError(
                f"the linear prefix is injective (rank {rank} of {self.n} inputs): nothing can be hidden")
        _, _, vt = torch.linalg.svd(a, full_matrices=True)
        self.row = vt[:rank].contiguous()
        self.null = vt[rank:].contiguous()
        self.rank = rank
        self.dim = self.n - rank
        self.norm = float(torch.linalg.matrix_norm(a, ord=2)) if a.numel() else 0.0

    def harmful(self, v: torch.Tensor) -> torch.Tensor:
        """``(I - P) v`` for ``v`` of shape ``(B, n)``."""
        if self.rank <= self.dim:
            return (v @ self.row.T) @ self.row
        return v - (v @ self.null.T) @ self.null

    def harmless(self, v: torch.Tensor) -> torch.Tensor:
        """``P v`` for ``v`` of shape ``(B, n)``."""
        if self.dim <= self.rank:
            return (v @ self.null.T) @ self.null
        return v - (v @ self.row.T) @ self.row

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for ``v`` of shape ``(B, n)`` (the output change of the linear prefix)."""
        return v @ self.matrix.T


_PROJECTORS: dict[int, tuple[HarmlessSubspace, Projector]] = {}


def projector(space: HarmlessSubspace | Projector) -> Projector:
    """The (cached per subspace object) :class:`Projector` of ``space``."""
    if isinstance(space, Projector):
        return space
    hit = _PROJECTORS.get(id(space))
    if hit is not None and hit[0] is space:
        return hit[1]
    proj = Projector(space)
    if len(_PROJECTORS) > 8:
        _PROJECTORS.clear()
    _PROJECTORS[id(space)] = (space, proj)
    return proj


# ---------------------------------------------------------------------------------------------
# Validation.

#: How far outside [0, 1] a pixel may be (round-off of the exact projections).
_EPS_BOX = 1e-12


def _images(proj: Projector, x: object, what: str = "x", *, box: bool = True) -> torch.Tensor:
    """A validated float64 copy of a batch ``(B, *input_shape)`` (a single image is accepted)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.asarray(x))
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"{what} must be a floating-point tensor in [0, 1], got {x.dtype}")
    shape = proj.input_shape
    if tuple(x.shape) == shape:
        x = x.unsqueeze(0)
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        hint = ""
        if len(shape) == 3 and x.ndim == 4 and tuple(x.shape[2:]) == shape[1:] and x.shape[1] != shape[0]:
            kinds = {1: "grayscale", 3: "RGB"}
            hint = (f" ({kinds.get(int(x.shape[1]), f'{x.shape[1]}-channel')} images for a model that takes "
                    f"{kinds.get(shape[0], f'{shape[0]}-channel')} input)")
        raise InputError(f"{what} must have shape (B, {', '.join(map(str, shape))}), got {tuple(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise InputError(f"{what} is an empty batch")
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{what} contains non-finite values (nan or inf)")
    out = x.detach().to(dtype=torch.float64, device="cpu").clone()
    if box and (float(out.min()) < -_EPS_BOX or float(out.max()) > 1.0 + _EPS_BOX):
        raise InputError(f"{what} must have values in [0, 1] (got range [{float(out.min()):.4g}, "
                         f"{float(out.max()):.4g}])")
    return out


def box_violation(y: torch.Tensor) -> torch.Tensor:
    """Per sample ``max(0, -y, y - 1)`` over pixels."""
    flat = y.reshape(y.shape[0], -1)
    return torch.clamp(torch.maximum(-flat, flat - 1.0), min=0.0).amax(dim=1)


# ---------------------------------------------------------------------------------------------
# Projection onto {anchor + N(A)} ∩ [0, 1]^n.


@dataclasses.dataclass
class ProjectionInfo:
    """Per-sample diagnostics of :func:`project_affine_box`.

    ``gap``: primal objective ``1/2 ||y - t||^2`` of the returned feasible ``y`` minus the dual
    objective of the last multiplier (>= 0, up to rounding: an upper bound on the suboptimality);
    ``rel_gap``: gap / max(primal, 1e-30); ``infeasibility``: ``||(I-P)(y(mu) - anchor)||`` of the
    dual iterate before repair; ``shrink``: the factor the final repair scaled the harmless part by (1: none needed); ``iterations``: how many dual steps ran.
    """

    gap: torch.Tensor
    rel_gap: torch.Tensor
    infeasibility: torch.Tensor
    shrink: torch.Tensor
    iterations: int




def _repair(proj: Projector, anchor: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make ``y`` feasible: project it onto ``anchor + N(A)``, then shrink the harmless part
    towards ``anchor`` (which is in the box) by the largest ``theta <= 1`` that keeps every pixel
    in ``[-1e-12, 1 + 1e-12]``. The result is in ``[0, 1]`` to 1e-12 and harmless up to round-off
    (no clipping). When the solver has converged ``theta`` is 1."""
    d = proj.harmless(y - anchor)
    inf = torch.full_like(d, math.inf)
    up = torch.where(d > 0, (1.0 + _EPS_BOX - anchor) / d, inf)
    lo = torch.where(d < 0, (-_EPS_BOX - anchor) / d, inf)
    theta = torch.minimum(up.amin(dim=1), lo.amin(dim=1)).clamp(0.0, 1.0)
    out = anchor + theta[:, None] * d
    return out, theta


def project_affine_box(space: HarmlessSubspace | Projector, anchor: torch.Tensor, target: torch.Tensor, *,
                       warm: int = 300, newton: int = 25) -> tuple[torch.Tensor, ProjectionInfo]:
    """The nearest point to ``target`` in ``{anchor + N(A)} ∩ [0, 1]^n``, per sample.

    ``anchor`` must lie in ``[0, 1]^n`` (so the set is non-empty). Solves the dual
    ``max_mu  min_{0<=y<=1} 1/2||y - t||^2 + mu.(y - anchor)``, ``mu`` in the row space: ``warm`` steps of FISTA with adaptive restart (the dual
    gradient ``(I - P)(y(mu) - anchor)`` is 1-Lipschitz), then up to ``newton`` semismooth Newton steps
    whose directions are exact active-set solves. The result is in ``[0, 1]`` and harmless up to
    round-off (see :func:`_repair`); ``info.gap`` bounds its suboptimality.
    Returns images shaped ``(B, *input_shape)`` and a :class:`ProjectionInfo`.
    """
    proj = projector(space)
    a = _images(proj, anchor, "anchor").reshape(-1, proj.n)
    t = _images(proj, target, "target", box=False).reshape(-1, proj.n)
    if t.shape[0] != a.shape[0]:
        raise InputError(f"target has {t.shape[0]} samples but anchor has {a.shape[0]}")
    y, info = _project_flat(proj, a, t, warm=warm, newton=newton)
    return y.reshape(-1, *proj.input_shape), info


def _dual_value(y: torch.Tensor, t: torch.Tensor, mu: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((y - t) ** 2).sum(1) + (mu * (y - a)).sum(1)


def _fista_from(proj: Projector, a: torch.Tensor, t: torch.Tensor, mu0: torch.Tensor, iters: int) -> torch.Tensor:
    """``iters`` steps of FISTA with adaptive restart on the dual from ``mu0``; returns the best ``mu``."""
    b = a.shape[0]
    mu = mu0.clone()
    nu = mu.clone()
    tk = torch.ones(b, dtype=torch.float64)
    q_best = torch.full((b,), -math.inf, dtype=torch.float64)
    mu_best = mu.clone()
    for _ in range(iters):
        y_nu = (t - nu).clamp(0.0, 1.0)
        mu_new = nu + proj.harmful(y_nu - a)
        y_new = (t - mu_new).clamp(0.0, 1.0)
        q_new = _dual_value(y_new, t, mu_new, a)
        worse = q_new < q_best
        mu_best = torch.where(worse[:, None], mu_best, mu_new)
        q_best = torch.where(worse, q_best, q_new)
        tk_next = (1.0 + torch.sqrt(1.0 + 4.0 * tk ** 2)) / 2.0
        beta = ((tk - 1.0) / tk_next)[:, None]
        nu = mu_new + beta * (mu_new - mu)
        nu = torch.where(worse[:, None], mu_best, nu)
        mu = torch.where(worse[:, None], mu_best, mu_new)
        tk = torch.where(worse, torch.ones_like(tk), tk_next)
    return mu_best


def _active_solve_row(proj: Projector, a: torch.Tensor, t: torch.Tensor, z: torch.Tensor,
                      chunk: int = 64) -> torch.Tensor:
    """The equality-constrained QP for the active set read off ``z = t - mu`` (pixels with
    ``z < 0`` fixed at 0, ``z > 1`` at 1), solved through the row space: returns the new ``mu``."""
    r = proj.row
    out = torch.empty_like(t)
    for s in range(0, a.shape[0], chunk):
        zs, ts, as_ = z[s:s + chunk], t[s:s + chunk], a[s:s + chunk]
        free = ((zs >= 0) & (zs <= 1)).to(torch.float64)
        bound = (zs > 1).to(torch.float64)
        m = torch.einsum("rn,bn,sn->brs", r, free, r)
        rhs = (free * ts + (1 - free) * bound - as_) @ r.T
        lam = torch.linalg.lstsq(m, rhs.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
        out[s:s + chunk] = lam @ r
    return out


def _active_solve_null(proj: Projector, a: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """As :func:`_active_solve_row`, through the null space (cheaper when ``dim < rank``), one
    sample at a time: returns ``z`` of the solution (``y`` plus the bound multipliers)."""
    n_basis = proj.null  # (d, n)
    out = torch.empty_like(t)
    for k in range(a.shape[0]):
        zk, tk, ak = z[k], t[k], a[k]
        act = (zk < 0) | (zk > 1)
        bvals = (zk > 1).to(torch.float64)
        c0 = n_basis @ (tk - ak)
        if not bool(act.any()):
            y = ak + c0 @ n_basis
            out[k] = y
            continue
        na = n_basis[:, act]  # (d, |A|)
        e = bvals[act] - ak[act]
        delta = torch.linalg.lstsq(na.T, (e - na.T @ c0).unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
        c = c0 + delta
        y = ak + c @ n_basis
        y[act] = bvals[act]
        nu = torch.linalg.lstsq(na, (-delta).unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
        zz = y.clone()
        zz[act] = bvals[act] + nu
        out[k] = zz
    return out


def _project_flat(proj: Projector, a: torch.Tensor, t: torch.Tensor, *, warm: int = 300,
                  newton: int = 25) -> tuple[torch.Tensor, ProjectionInfo]:
    """Dual FISTA warm start (``warm`` steps), then a semismooth Newton method on the dual with
    backtracking: the Newton direction is the exact solution of the equality-constrained QP of the
    current active set (pixels with ``t - mu`` outside ``[0, 1]`` fixed at the bound), the step
    the largest of 1, 1/2, ... that increases the dual. Once the active set is right a full step
    solves the problem exactly. Finally made feasible by :func:`_repair` (exact when converged;
    otherwise a feasible point whose suboptimality is bounded by the reported duality gap)."""
    mu = _fista_from(proj, a, t, torch.zeros_like(t), warm)
    q = _dual_value((t - mu).clamp(0.0, 1.0), t, mu, a)
    use_row = proj.rank <= proj.dim
    todo = torch.arange(a.shape[0])
    it = 0
    for it in range(1, newton + 1):
        if todo.numel() == 0:
            break
        at, tt, mt = a[todo], t[todo], mu[todo]
        z = tt - mt
        if use_row:
            target = _active_solve_row(proj, at, tt, z)
        else:
            target = proj.harmful(tt - _active_solve_null(proj, at, tt, z))
        step = target - mt
        alpha = torch.ones(todo.numel(), dtype=torch.float64)
        accepted = torch.zeros(todo.numel(), dtype=torch.bool)
        q_old = q[todo]
        inf_old = proj.harmful(z.clamp(0.0, 1.0) - at).norm(dim=1)
        new_mu = mt.clone()
        new_q = q_old.clone()
        for _ in range(30):
            cand = mt + alpha[:, None] * step
            yc = (tt - cand).clamp(0.0, 1.0)
            qc = _dual_value(yc, tt, cand, at)
            # ascent on the dual, or (near the optimum, where q is flat to round-off) a halving
            # of the constraint violation
            closer = proj.harmful(yc - at).norm(dim=1) <= 0.5 * inf_old
            ok = ((qc >= q_old - 1e-15 * q_old.abs().clamp_min(1.0)) | closer) & ~accepted
            new_mu[ok] = cand[ok]
            new_q[ok] = qc[ok]
            accepted |= ok
            if bool(accepted.all()):
                break
            alpha = torch.where(accepted, alpha, alpha / 2)
        mu[todo] = new_mu
        q[todo] = new_q
        y = (t[todo] - mu[todo]).clamp(0.0, 1.0)
        infeas = proj.harmful(y - at).norm(dim=1)
        scale = at.norm(dim=1).clamp_min(1.0)
        fin = (infeas <= 1e-13 * scale) | ~accepted
        todo = todo[~fin]
    z = t - mu
    infeas = proj.harmful(z.clamp(0, 1) - a).norm(dim=1)
    y, theta = _repair(proj, a, z.clamp(0.0, 1.0))
    q = _dual_value(z.clamp(0.0, 1.0), t, mu, a)
    primal = 0.5 * ((y - t) ** 2).sum(1)
    gap = primal - q
    rel = gap / primal.clamp_min(1e-30)
    return y, ProjectionInfo(gap=gap, rel_gap=rel, infeasibility=infeas, shrink=theta, iterations=it)


# ---------------------------------------------------------------------------------------------
# Privatisation.


@dataclasses.dataclass
class Result:
    """A privatised batch.

    ``x_hat`` (float64, ``(B, *input_shape)``, in ``[0, 1]``), ``delta = x_hat - x`` (harmless);
    per sample: ``box_violation`` ``max(0, -x_hat, x_hat - 1)``, ``output_deviation``
    ``||A (x_hat - x)||`` of the linear prefix, ``harmful_residual`` ``||A delta|| / (||A|| ||delta||)``,
    ``mse`` ``mean((x_hat - x)^2)``; ``method`` and solver diagnostics in ``info``.
    """

    x_hat: torch.Tensor
    delta: torch.Tensor
    box_violation: torch.Tensor
    output_deviation: torch.Tensor
    harmful_residual: torch.Tensor
    mse: torch.Tensor
    method: str
    info: dict[str, object]


def _result(proj: Projector, x: torch.Tensor, x_hat: torch.Tensor, method: str, info: dict[str, object]) -> Result:
    b = x.shape[0]
    x_hat = x_hat.reshape(b, -1)
    d = x_hat - x.reshape(b, -1)
    out = proj.apply(d).norm(dim=1)
    res = out / (proj.norm * d.norm(dim=1)).clamp_min(1e-300)
    return Result(x_hat=x_hat.reshape(b, *proj.input_shape), delta=d.reshape(b, *proj.input_shape),
                  box_violation=box_violation(x_hat), output_deviation=out, harmful_residual=res,
                  mse=(d ** 2).mean(dim=1), method=method, info=info)


def _check_positive(value: object, name: str, *, integer: bool = False) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok and integer:
        ok = isinstance(value, (int, np.integer))
    if not ok or not math.isfinite(float(value)) or float(value) <= 0:  # type: ignore[arg-type]
        raise InputError(f"{name} must be a positive {'int' if integer else 'number'}, got {value!r}")


def privatize_paper(space: HarmlessSubspace | Projector, x: torch.Tensor, *, steps: int = 300, lr: float = 0.05,
                    penalty: float = 10.0, generator: torch.Generator | None = None,
                    init_scale: float = 0.1, warm: int = 300, newton: int = 25) -> Result:
    """Algorithm 1 of the paper: maximise ``MSE(x_hat, x) - penalty * mean(box violation^2)`` over
    the harmless coefficients ``c`` (``x_hat = x + U c``) with Adam from a random start (the
    objective is flat at ``c = 0``), then restore feasibility inside the affine set: ``x_hat`` is
    replaced by its projection onto ``{x + U c} ∩ [0, 1]^n`` (not clipped, which would break
    harmlessness). ``x`` is not modified.
    """
    proj = projector(space)
    xs = _images(proj, x, "x")
    _check_positive(steps, "steps", integer=True)
    _check_positive(lr, "lr")
    _check_positive(penalty, "penalty")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    b = xs.shape[0]
    flat = xs.reshape(b, -1)
    u = proj.null  # (d, n)
    c0 = torch.randn(b, proj.dim, generator=gen, dtype=torch.float64)
    c0 = c0 * (init_scale * math.sqrt(proj.n) / c0.norm(dim=1, keepdim=True))
    c = c0.clone().requires_grad_(True)
    opt = torch.optim.Adam([c], lr=lr)
    history = []
    for step in range(int(steps)):
        opt.zero_grad()
        y = flat + c @ u
        mse = ((y - flat) ** 2).mean(dim=1)
        viol = (torch.relu(-y) ** 2 + torch.relu(y - 1.0) ** 2).mean(dim=1)
        loss = -(mse - penalty * viol).sum()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            history.append(float((mse - penalty * viol).mean().detach()))
    with torch.no_grad():
        y = flat + c.detach() @ u
        raw_violation = box_violation(y)
        x_hat, pinfo = _project_flat(proj, flat, y, warm=warm, newton=newton)
    info: dict[str, object] = {"raw_box_violation": raw_violation, "projection": pinfo, "objective": history,
                               "steps": steps, "lr": lr, "penalty": penalty}
    return _result(proj, xs, x_hat, "paper", info)


def make_decoy(kind: str | torch.Tensor, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """A decoy batch shaped like ``x``: ``"grey"`` (0.5 everywhere), ``"noise"`` (uniform [0, 1]),
    ``"shift"`` (the batch rolled by one: every image's decoy is another image of the batch), or a
    tensor (one image broadcast to the batch, or a batch)."""
    if isinstance(kind, torch.Tensor):
        d = kind.detach().to(torch.float64)
        if tuple(d.shape) == tuple(x.shape[1:]):
            d = d.unsqueeze(0).expand_as(x)
        if tuple(d.shape) != tuple(x.shape):
            raise InputError(f"decoy must have shape {tuple(x.shape[1:])} or {tuple(x.shape)}, got {tuple(d.shape)}")
        if not bool(torch.isfinite(d).all()):
            raise InputError("decoy contains non-finite values (nan or inf)")
        return d.clone()
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if kind in ("grey", "gray"):
        return torch.full(x.shape, 0.5, dtype=torch.float64)
    if kind == "noise":
        return torch.rand(x.shape, generator=gen, dtype=torch.float64)
    if kind in ("shift", "other"):
        if x.shape[0] < 2:
            raise InputError("decoy 'shift' needs a batch of at least 2 images")
        return torch.roll(x.detach().to(torch.float64), 1, dims=0)
    raise InputError(f"unknown decoy {kind!r}: use 'grey', 'noise', 'shift' or an image tensor")


def privatize_decoy(space: HarmlessSubspace | Projector, x: torch.Tensor, decoy: str | torch.Tensor = "grey", *,
                    generator: torch.Generator | None = None, warm: int = 300, newton: int = 25) -> Result:
    """Our convex formulation: ``min ||x_hat - t||^2  s.t.  A x_hat = A x, 0 <= x_hat <= 1``, with
    ``t`` the decoy (see :func:`make_decoy`), solved to the global optimum (the projection of
    ``t`` onto ``{x + N(A)} ∩ [0, 1]^n``, :func:`project_affine_box`). The duality gap per sample
    is in ``info["projection"].gap``. ``x`` is not modified."""
    proj = projector(space)
    xs = _images(proj, x, "x")
    t = make_decoy(decoy, xs, generator=generator)
    t = _images(proj, t, "decoy", box=False)
    b = xs.shape[0]
    x_hat, pinfo = _project_flat(proj, xs.reshape(b, -1), t.reshape(b, -1), warm=warm, newton=newton)
    name = decoy if isinstance(decoy, str) else "image"
    return _result(proj, xs, x_hat, f"decoy-{name}", {"projection": pinfo, "decoy": t})


# ---------------------------------------------------------------------------------------------
# 8-bit output.


@dataclasses.dataclass
class QuantizeResult:
    """``naive``: ``round(255 x_hat) / 255``; ``improved``: after greedy single-pixel +-1/255 flips
    that reduce ``||A (q - x)||``. Per sample ``*_deviation`` is ``||A (q - x)||``; ``flips`` how
    many pixels the greedy pass changed."""

    naive: torch.Tensor
    improved: torch.Tensor
    naive_deviation: torch.Tensor
    improved_deviation: torch.Tensor
    flips: torch.Tensor


def quantize_harmless(space: HarmlessSubspace | Projector, x_hat: torch.Tensor, x: torch.Tensor, *,
                      max_flips: int = 5000) -> QuantizeResult:
    """Round a privatised batch to 8 bits, then greedily flip single pixels by ``+-1/255`` (staying
    on the 8-bit grid in ``[0, 1]``) while that reduces ``||A (q - x)||``, the best flip per image
    per round, all images at once."""
    proj = projector(space)
    xs = _images(proj, x, "x").reshape(-1, proj.n)
    xh = _images(proj, x_hat, "x_hat").reshape(-1, proj.n)
    if xs.shape[0] != xh.shape[0]:
        raise InputError(f"x_hat has {xh.shape[0]} samples but x has {xs.shape[0]}")
    levels = torch.round(xh * 255.0)
    naive = levels / 255.0
    amat = proj.matrix
    gram = amat.T @ amat  # (n, n)
    diag = torch.diagonal(gram)
    r = proj.apply(naive - xs)  # (B, m)
    g = r @ amat  # A^T r, (B, n)
    lv = levels.clone()
    flips = torch.zeros(xs.shape[0], dtype=torch.int64)
    rows = torch.arange(xs.shape[0])
    h = 1.0 / 255.0
    for _ in range(int(max_flips)):
        # change of ||r||^2 when pixel i moves by s h: 2 s h g_i + h^2 G_ii
        gain_up = 2 * h * g + h * h * diag
        gain_dn = -2 * h * g + h * h * diag
        gain_up = torch.where(lv < 255, gain_up, torch.full_like(gain_up, math.inf))
        gain_dn = torch.where(lv > 0, gain_dn, torch.full_like(gain_dn, math.inf))
        best_up, i_up = gain_up.min(dim=1)
        best_dn, i_dn = gain_dn.min(dim=1)
        use_up = best_up <= best_dn
        best = torch.where(use_up, best_up, best_dn)
        idx = torch.where(use_up, i_up, i_dn)
        sign = torch.where(use_up, 1.0, -1.0).to(torch.float64)
        move = best < -1e-18
        if not bool(move.any()):
            break
        rr, ii, ss = rows[move], idx[move], sign[move]
        lv[rr, ii] += ss
        g[rr] += (ss * h)[:, None] * gram[ii]
        flips[rr] += 1
    improved = lv / 255.0
    return QuantizeResult(
        naive=naive.reshape(-1, *proj.input_shape), improved=improved.reshape(-1, *proj.input_shape),
        naive_deviation=proj.apply(naive - xs).norm(dim=1), improved_deviation=proj.apply(improved - xs).norm(dim=1),
        flips=flips)

