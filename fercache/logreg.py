"""L2-regularised multinomial logistic regression that converges, with C chosen by the one-SE rule.

The objective is scikit-learn's (`LogisticRegression`, lbfgs): weighted mean cross-entropy plus
||W||^2 / (2 C sum(w)), the intercept unpenalised. It is minimised by scipy's L-BFGS-B (the solver
scikit-learn calls) on a loss and gradient that torch computes on any device (GPU too): the two
products with X, which are all the cost, in float32 for large data (float64 for small), the rest
in float64, so the line search sees a loss precise enough to reach the optimum. Every class of `CLASSES` gets a row
whatever the training rows hold: a class without rows is fitted like the others (its weights stay
near zero, its bias falls until its mean probability is within the tolerance), so heads always
have the same shape.

Why the one-standard-error rule: validation scores carry sampling noise (one binomial standard
error, sqrt(a (1 - a) / n_val), is 0.6 points on 5,742 faces and 13 points on a 10-shot draw's 14),
so the single best score among 13 Cs picks noise as often as signal. The rule takes the strongest
regularisation (smallest C) whose validation accuracy is within one standard error of the best
and whose validation cross-entropy is within one standard error of the lowest. Accuracy alone is
blind to how sure the head is: a head regularised to near-uniform probabilities keeps most of its
argmaxes, so on a flat accuracy curve the smallest C would win and every probability sit near 1/7;
the loss condition keeps the choice where the probabilities still mean something. With balanced
class weights the accuracy criterion is what they aim at, balanced accuracy (its standard error:
sqrt(sum over classes r (1 - r) / n_c) / K).
"""

from __future__ import annotations

import numpy as np

from fercache.errors import UserError, warn
from fercache.heads import Head, class_weights, moments
from fercache.names import CLASSES

C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 13))  # half-decade steps
VAL_FRACTION = 0.2
TOL = 1e-4  # scikit-learn's: the largest gradient component at the optimum
MAX_ITER = 1000
PATIENCE = 3  # grid steps without a better validation score or loss before the walk stops
MIN_C = 1e-8  # where the strongest C tried is strictly the best, the walk goes on down to here at most
LOSS_TOL = 1e-4  # a validation cross-entropy lower by less than this is no improvement (numerical noise)


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (fit, validation): `fraction` of each class held out, at least one row kept to fit.

    A class with one row stays whole in the fit part (scikit-learn's stratified split refuses
    such a class); a class with none is simply absent.
    """
    rng = np.random.default_rng(seed)
    fit_rows, val_rows = [], []
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        n_val = min(int(round(len(rows) * fraction)), len(rows) - 1) if len(rows) > 1 else 0
        val_rows.append(rows[:n_val])
        fit_rows.append(rows[n_val:])
    return np.sort(np.concatenate(fit_rows)), np.sort(np.concatenate(val_rows))


def sample_weights(y: np.ndarray, class_weight: str, classes: int = len(CLASSES)) -> np.ndarray:
    """Per-row weights: each row its class's weight (`heads.class_weights`)."""
    return class_weights(y, class_weight, classes)[np.asarray(y, dtype=np.int64)]


class Problem:
    """One training set on one device: the objective's loss and gradient, preconditioned.

    L-BFGS on raw pixels needs hundreds of iterations per C: neighbouring pixels are so
    correlated that the covariance's eigenvalues span five decades. So the problem is solved in
    the covariance's eigenbasis (rows centred, then rotated once: X U), where the Hessian is
    nearly diagonal, h * eigenvalue + 1 / (C sum(w)) with h ~ 1/4 (softmax curvature), and each
    coordinate is scaled by that diagonal's inverse square root. Centring and rotating change
    nothing about the optimum (the intercept is unpenalised, ||W U|| = ||W||); `weights` maps
    the solution back, and `check` measures the gradient of the original objective there.
    """

    CURVATURE = 0.25
    FLOAT64_UP_TO = 1 << 24  # rows x features: below this the products are cheap enough in float64

    def __init__(self, X: np.ndarray, y: np.ndarray, weights: np.ndarray, device: str = "cpu",
                 dtype: str = "auto", classes: int = len(CLASSES)):
        import torch

        self.torch, self.k, self.d = torch, classes, X.shape[1]
        if dtype == "auto":  # float32 products reach a gradient of ~1e-5 on standardised rows: enough for TOL
            dtype = "float64" if X.size <= self.FLOAT64_UP_TO else "float32"
        self.dtype = getattr(torch, dtype)
        Xt = torch.as_tensor(np.ascontiguousarray(X, dtype=dtype), device=device)
        self.centre = Xt.mean(0)
        Xt = Xt - self.centre
        eigenvalues, self.U = torch.linalg.eigh((Xt.T @ Xt).double() / len(Xt))
        self.eigenvalues = eigenvalues.clamp_(min=0)
        self.X = Xt @ self.U.to(self.dtype)  # the rotated rows; the cost of a step is two products with them
        self.y = torch.as_tensor(np.asarray(y, dtype=np.int64), device=device)
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64), device=device)
        self.w = w / w.sum()  # weighted mean: the loss's scale does not grow with n
        self.sw_sum = float(w.sum())
        self.rows = torch.arange(len(y), device=device)

    def scale(self, C: float):
        """Per-coordinate scale of the rotated weights (the intercept's is 1)."""
        s = (self.CURVATURE * self.eigenvalues + 1.0 / (C * self.sw_sum)).rsqrt()
        return self.torch.cat([s, s.new_ones(1)])

    def loss_grad(self, theta: np.ndarray, C: float, scale) -> tuple[float, np.ndarray]:
        """Loss and gradient in the scaled coordinates V, with rotated weights W_r = V * scale."""
        torch = self.torch
        W = torch.as_tensor(theta, device=self.X.device).view(self.k, self.d + 1) * scale
        loss, grad = self._loss_grad(W, C)
        return loss, (grad * scale).cpu().numpy().ravel()

    def _loss_grad(self, W, C: float):
        torch = self.torch
        z = torch.addmm(W[:, -1].to(self.dtype), self.X, W[:, :-1].to(self.dtype).T).double()  # the cost
        logp = torch.log_softmax(z, 1)
        penalty = 1.0 / (C * self.sw_sum)
        loss = -(self.w * logp[self.rows, self.y]).sum() + 0.5 * penalty * (W[:, :-1] ** 2).sum()
        g = logp.exp_()
        g[self.rows, self.y] -= 1
        g *= self.w[:, None]  # d loss / d z
        grad = torch.empty_like(W)
        grad[:, :-1] = (g.to(self.dtype).T @ self.X).double() + penalty * W[:, :-1]  # the other product with X
        grad[:, -1] = g.sum(0)
        return float(loss), grad

    def weights(self, theta: np.ndarray, C: float) -> tuple[np.ndarray, np.ndarray]:
        """The solution in the caller's coordinates: weight (k, d) and bias (k,) for uncentred rows."""
        W = self.torch.as_tensor(theta, device=self.X.device).view(self.k, self.d + 1) * self.scale(C)
        weight = W[:, :-1] @ self.U.T
        bias = W[:, -1] - weight @ self.centre.double()
        return weight.cpu().numpy(), bias.cpu().numpy()

    def check(self, theta: np.ndarray, C: float) -> float:
        """The largest gradient component of the original objective (in pixel coordinates) at theta."""
        W = self.torch.as_tensor(theta, device=self.X.device).view(self.k, self.d + 1) * self.scale(C)
        grad = self._loss_grad(W, C)[1]
        # The caller's rows are uncentred (X = Xc + centre): d/dweight gains the bias gradient times the centre.
        weight_grad = grad[:, :-1] @ self.U.T + grad[:, -1:] * self.centre.double()
        return float(self.torch.cat([weight_grad, grad[:, -1:]], 1).abs().max())

    def theta_of(self, weight: np.ndarray, bias: np.ndarray, C: float) -> np.ndarray:
        """`weights`' inverse: scaled coordinates for this C of a solution (a warm start)."""
        torch = self.torch
        weight = torch.as_tensor(weight, dtype=torch.float64, device=self.X.device)
        bias = torch.as_tensor(bias, dtype=torch.float64, device=self.X.device)
        W = torch.cat([weight @ self.U, (bias + weight @ self.centre.double())[:, None]], 1)
        return (W / self.scale(C)).cpu().numpy().ravel()


def minimise(problem: Problem, C: float, theta0: np.ndarray | None = None, tol: float = TOL,
             max_iter: int = MAX_ITER) -> tuple[np.ndarray, dict]:
    """L-BFGS-B from `theta0` (zeros), in `problem`'s scaled coordinates for this C.

    Returns them and `{"n_iter", "converged", "grad_max"}`; converged means the largest gradient
    component of the original objective is at most `tol` (scikit-learn's criterion), measured on
    the result rather than taken from the solver's message. The solver works in the scaled
    coordinates, so it is asked for `tol` times the smallest scale, and ten times less again while
    the original gradient is still above `tol` (the rotation can gather a gradient into one
    coordinate), within `max_iter` iterations in all.
    """
    from scipy.optimize import minimize

    torch = problem.torch
    scale = problem.scale(C)
    theta0 = np.zeros(problem.k * (problem.d + 1)) if theta0 is None else theta0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: waking a second for n x 7 arrays costs more than it saves (fit_linear too)
    gtol, n_iter, theta = tol * float(scale.min()), 0, theta0
    try:
        for _ in range(3):
            res = minimize(problem.loss_grad, theta, args=(C, scale), jac=True, method="L-BFGS-B",
                           options={"maxiter": max_iter - n_iter, "maxls": 50, "gtol": gtol,
                                    "ftol": 64 * np.finfo(float).eps})
            theta, n_iter, grad_max = res.x, n_iter + int(res.nit), problem.check(res.x, C)
            if grad_max <= tol or n_iter >= max_iter:
                break
            gtol /= 10
    finally:
        torch.set_num_threads(threads)
    return theta, {"n_iter": n_iter, "converged": grad_max <= tol, "grad_max": grad_max}


def fit_logreg(X: np.ndarray, y: np.ndarray, *, seed: int = 0, standardize: bool = True, class_weight: str = "none",
               val: tuple[np.ndarray, np.ndarray] | None = None, grid: tuple[float, ...] = C_GRID,
               device: str = "cpu", classes: int = len(CLASSES)) -> tuple[Head, dict]:
    """Logistic regression on `X`, C chosen by the one-SE rule on validation rows, never on test.

    Validation is `val` (features and labels, e.g. PublicTest) when given, else a stratified
    `VAL_FRACTION` of the training rows (fixed by `seed`), after which the chosen C is refitted on
    all of them. Standardisation statistics come from the rows each fit is fitted on, never from
    validation rows. The grid is walked from strong to weak regularisation, each fit starting from
    the previous solution, and stops once neither validation score nor loss has strictly improved
    for `PATIENCE` steps; where the strongest C tried is strictly the best, it goes on down by
    half-decades until it is not (at most to `MIN_C`). A choice at either end of the Cs tried is
    said in one warning (`C_at_edge`), as are fits that do not converge within `MAX_ITER`
    iterations. Returns the head (always one row per class) and the search: `{"C", "rule",
    "validation": [{"C", "val_loss", "val_loss_se", "val_acc", "val_se", "n_iter", "converged"}],
    "val_count", "C_at_edge", ...}`. The head has `classes` rows (FER2013's 7 unless given).
    """
    y = np.asarray(y, dtype=np.int64)
    classes = max(classes, int(y.max()) + 1 if len(y) else 0)
    if X.ndim != 2 or len(X) != len(y) or len(y) == 0:
        raise UserError(f"logistic regression needs N x D features and N labels (got {X.shape} and {y.shape})")
    X = np.asarray(X, dtype=np.float32)
    if val is None:
        fit_rows, val_rows = stratified_split(y, VAL_FRACTION, seed)
        if len(val_rows) == 0:
            raise UserError(f"{len(y)} training rows leave none per class to validate C on: use more (--shots 3 or "
                            "more) or validate on PublicTest (--val public_test)")
        X_fit, y_fit, X_val, y_val = X[fit_rows], y[fit_rows], X[val_rows], y[val_rows]
    else:
        X_fit, y_fit, X_val, y_val = X, y, np.asarray(val[0], dtype=np.float32), np.asarray(val[1], dtype=np.int64)
    mean, std = moments(X_fit, standardize)
    problem = Problem((X_fit - mean) / std, y_fit, sample_weights(y_fit, class_weight, classes), device,
                      classes=classes)
    curve, solutions = [], []
    # What chooses C: accuracy, or with balanced class weights what they aim at, balanced accuracy
    score, se = ("val_bacc", "val_bacc_se") if class_weight == "balanced" else ("val_acc", "val_se")

    def step(C: float, start: tuple | None) -> None:
        theta, info = minimise(problem, C, None if start is None else problem.theta_of(*start, C))
        solution = problem.weights(theta, C)
        head = _head(*solution, mean, std, standardize)
        losses, right = head.losses(X_val, y_val)
        acc, n = float(right.mean()), len(y_val)
        row = {"C": C, "val_loss": float(losses.mean()),
               "val_loss_se": float(losses.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
               "val_acc": acc, "val_se": float(np.sqrt(acc * (1 - acc) / n))}
        if class_weight == "balanced":
            row.update(zip(("val_bacc", "val_bacc_se"), balanced_accuracy(y_val, head.predict(X_val))))
        at = 0 if curve and C < curve[0]["C"] else len(curve)
        solutions.insert(at, solution)
        curve.insert(at, {**row, "n_iter": info["n_iter"], "converged": info["converged"]})

    last_better = 0
    for C in grid:  # strong to weak regularisation, each fit from the previous solution
        step(C, solutions[-1] if solutions else None)
        new, before = curve[-1], curve[:-1]
        if not before or new[score] > max(r[score] for r in before) \
                or new["val_loss"] < min(r["val_loss"] for r in before) - LOSS_TOL:
            last_better = len(curve) - 1
        elif len(curve) - 1 - last_better >= PATIENCE:
            break
    # Only while strictly better: on a tie the strongest C has shown nothing, and walking on would
    # hand the one-SE rule ever smaller Cs (down to MIN_C, every probability 1/7).
    while len(curve) > 1 and curve[0][score] > max(r[score] for r in curve[1:]) and curve[0]["C"] > MIN_C:
        step(curve[0]["C"] / np.sqrt(10), solutions[0])
    best = max(curve, key=lambda r: r[score])
    lowest = min(curve, key=lambda r: r["val_loss"])
    within = [i for i, r in enumerate(curve) if r[score] >= best[score] - best[se]
              and r["val_loss"] <= lowest["val_loss"] + lowest["val_loss_se"]]
    chosen = within[0] if within else curve.index(best)
    C, solution = curve[chosen]["C"], solutions[chosen]
    edge = "strongest" if chosen == 0 else "weakest" if chosen == len(curve) - 1 else None
    if edge:
        warn(f"logistic regression: C={C:g} is the {edge} regularisation tried (C from {curve[0]['C']:g} to "
             f"{curve[-1]['C']:g}); validation ({len(y_val)} faces) shows no turn beyond it, so C is a bound, "
             "not an optimum")
    final = {"n_iter": curve[chosen]["n_iter"], "converged": curve[chosen]["converged"]}
    if val is None:  # refit on every training row (their own standardisation), from the validation fit's solution
        fit_moments, (mean, std) = (mean, std), moments(X, standardize)
        problem = Problem((X - mean) / std, y, sample_weights(y, class_weight, classes), device, classes=classes)
        theta, final = minimise(problem, C, problem.theta_of(*_restandardise(*solution, fit_moments, (mean, std)), C))
        solution = problem.weights(theta, C)
    stalled = [f"C={r['C']:g}" for r in curve if not r["converged"]] + ([] if final["converged"] else ["the final fit"])
    if stalled:
        warn(f"logistic regression: the fit at {', '.join(stalled)} did not converge (largest gradient component "
             f"still above {TOL:g} after at most {MAX_ITER} iterations); its figures are approximate")
    search = {"C": C, "rule": "one standard error", "criterion": score, "best_val_C": best["C"],
              "lowest_val_loss_C": lowest["C"], "C_at_edge": edge, "class_weight": class_weight,
              "val": "given" if val is not None else f"{VAL_FRACTION:.0%} of train", "val_count": int(len(y_val)),
              "val_fraction": VAL_FRACTION if val is None else None, "validation": curve,
              "n_iter": final["n_iter"], "converged": final["converged"]}
    return _head(*solution, mean, std, standardize).without_absent(y), search


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """Mean recall over the classes present, and its standard error: sqrt(sum r (1 - r) / n_c) / K."""
    recalls = [(float(np.mean(pred[y == c] == c)), int(np.sum(y == c))) for c in np.unique(y)]
    return (float(np.mean([r for r, _ in recalls])),
            float(np.sqrt(sum(r * (1 - r) / n for r, n in recalls)) / len(recalls)))


def _head(weight: np.ndarray, bias: np.ndarray, mean: np.ndarray, std: np.ndarray, standardize: bool) -> Head:
    """A head on raw rows from a solution on rows standardised by `mean` and `std`."""
    return Head(weight.astype(np.float32), bias.astype(np.float32), mean, std, "logreg", standardize)


def _restandardise(weight: np.ndarray, bias: np.ndarray, old: tuple, new: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The same function of raw rows, for rows standardised by `new` (mean, std) instead of `old`."""
    raw = weight / old[1]
    return raw * new[1], bias - raw @ old[0] + raw @ new[0]
