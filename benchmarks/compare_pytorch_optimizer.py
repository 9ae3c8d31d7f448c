"""samkit against pytorch_optimizer on the SAM-family methods both ship, weight for weight.

Run from the repository root (pytorch_optimizer is a comparison tool, not a samkit dependency)::

    .venv/bin/pip install pytorch_optimizer
    .venv/bin/python benchmarks/compare_pytorch_optimizer.py      # a few seconds

For SAM, ASAM (SAM's ``adaptive``), GSAM, WSAM (decoupled and coupled), LookSAM and Friendly-SAM,
both implementations start from the same float64 model (a 3-layer tanh MLP, 6 parameter tensors)
and take the same steps on the same batches over ``torch.optim.SGD(lr=0.1, momentum=0.9)``, each
driven as its documentation says. The script reports, per method, the largest difference of any
weight after each step, the forward passes each step took (a forward hook), and checks that
explain any difference: the same run with pytorch_optimizer's gradient norm taken in float64, or
each implementation against a short float64 reference of the rule it follows (the paper's
equation, or the authors' code). pytorch_optimizer's bSAM has no samkit counterpart; its restore
is checked on its own. Writes ``benchmarks/results/compare_pytorch_optimizer.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    import samkit  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from samkit.optim import SAM
from samkit.optim.friendly_sam import FriendlySAM
from samkit.optim.gsam import GSAM
from samkit.optim.looksam import LookSAM
from samkit.optim.wsam import WSAM

RESULTS = Path(__file__).resolve().parent / "results" / "compare_pytorch_optimizer.json"
LR, MOMENTUM, RHO = 0.1, 0.9, 0.05
SGD_KW = {"lr": LR, "momentum": MOMENTUM}  # the base optimizer of every run
#: The same update: with pytorch_optimizer's gradient norm taken in float64 (its own is float32),
#: no weight differs from samkit's by more than this after any step (float64, weights ~0.3).
SAME = 1e-12
F64 = "pytorch_optimizer with its norm in float64"

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def make_model(single_tensor: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if single_tensor:  # one parameter tensor: per-tensor and global norms coincide
        return nn.Linear(8, 4, bias=False).double()
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    ).double()


def make_batches(steps: int) -> Batches:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(32, 8, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (32,), generator=g),
        )
        for _ in range(steps)
    ]


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def run(model: nn.Module, data: Batches, step: Callable) -> tuple[list, list[int]]:
    """Weights after each step and forward passes per step; ``step(x, y, closure)``."""
    passes = [0]
    hook = model.register_forward_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
    history, counts = [], []
    try:
        for x, y in data:

            def closure(x=x, y=y):
                model.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            passes[0] = 0
            step(x, y, closure)
            counts.append(passes[0])
            history.append(snapshot(model))
    finally:
        hook.remove()
    return history, counts


def compare(ours: tuple[list, list[int]], theirs: tuple[list, list[int]]) -> dict:
    per_step = [max_diff(a, b) for a, b in zip(ours[0], theirs[0])]
    return {
        "max_abs_weight_diff": max(per_step),
        "per_step_max_abs_diff": per_step,
        "passes_per_step": {"samkit": ours[1], "pytorch_optimizer": theirs[1]},
    }


# -- how each implementation is driven ------------------------------------------------------------


def samkit_step(opt: torch.optim.Optimizer) -> Callable:
    return lambda x, y, closure: opt.step(closure)  # both passes (LookSAM: one between SAM steps)


def po_step(opt: torch.optim.Optimizer) -> Callable:
    """pytorch_optimizer's documented use: the gradient at w first, then step(closure)."""

    def step(x, y, closure):
        closure()
        opt.step(closure)

    return step


def po_step_whole(opt: torch.optim.Optimizer) -> Callable:
    return lambda x, y, closure: opt.step(closure)  # WSAM's step runs both passes itself


@contextlib.contextmanager
def float64_norms() -> Iterator[None]:
    """pytorch_optimizer's SAM module with its global gradient norm taken in float64 (its own
    ``get_global_gradient_norm`` returns float32, whatever the parameters' dtype)."""
    import pytorch_optimizer.optimizer.sam as po_sam

    original = po_sam.get_global_gradient_norm

    def norm64(param_groups, device=None, *, weight_adaptive=False):
        total = torch.zeros((), dtype=torch.float64)
        for group in param_groups:
            adaptive = weight_adaptive and group.get("adaptive", False)
            for p in group["params"]:
                if p.grad is not None:
                    g = p.grad * p.abs() if adaptive else p.grad
                    total = total + g.double().square().sum()
        return total.reshape(1)

    po_sam.get_global_gradient_norm = norm64
    try:
        yield
    finally:
        po_sam.get_global_gradient_norm = original


# -- float64 references of the rules ----------------------------------------------------------


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _norm(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum(t.square().sum() for t in ts))


def _sam_gradient(model, x, y, direction):
    """grad L(w + e), e = rho d / ||d||, the weights restored exactly afterwards."""
    params = list(model.parameters())
    saved = snapshot(model)
    scale = RHO / (_norm(direction) + 1e-12)
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(d * scale)
    g_p = _grads(model, x, y)
    with torch.no_grad():
        for p, w in zip(params, saved):
            p.copy_(w)
    return g_p


def _base_step(model, sgd, update):
    for p, u in zip(model.parameters(), update):
        p.grad = u
    sgd.step()


def fsam_reference(data: Batches, sigma: float, lmbda: float, authors: bool) -> list:
    """Friendly-SAM by hand. ``authors=False``: the paper's update as samkit reads it,
    m_t = lambda m_{t-1} + (1 - lambda) g_t (m_{-1} = 0), then d_t = g_t - sigma m_t.
    ``authors=True``: the authors' code (nblt/F-SAM, utils.py): m = g_0 and d_0 = g_0 at the
    first step, then d_t = g_t - sigma m_{t-1}, then the same moving average."""
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    m: list[torch.Tensor] | None = None
    history = []
    for x, y in data:
        g = _grads(model, x, y)
        if authors:
            if m is None:
                d, m = g, [t.clone() for t in g]
            else:
                d = [gi - sigma * mi for gi, mi in zip(g, m)]
                m = [lmbda * mi + (1 - lmbda) * gi for gi, mi in zip(g, m)]
        else:
            m = [(lmbda * mi if m else 0) + (1 - lmbda) * gi for gi, mi in zip(g, m or g)]
            d = [gi - sigma * mi for gi, mi in zip(g, m)]
        _base_step(model, sgd, _sam_gradient(model, x, y, d))
        history.append(snapshot(model))
    return history


def looksam_reference(data: Batches, k: int, alpha: float, per_tensor: bool) -> list:
    """LookSAM by hand. Every k-th step SAM, keeping g_v = g_s - (<g_s, g> / ||g||^2) g; the
    others g + alpha (||g|| / ||g_v||) g_v. ``per_tensor=False``: inner products and norms over
    the whole gradient (Algorithm 1 as samkit reads it); True: per parameter tensor, with
    pytorch_optimizer's 1e-8 added to ||g_v||."""
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    g_v: list[torch.Tensor] = []
    history = []
    for t, (x, y) in enumerate(data):
        g = _grads(model, x, y)
        if t % k == 0:
            update = _sam_gradient(model, x, y, g)
            if per_tensor:
                g_v = [s - (s * c).sum() / c.square().sum() * c for s, c in zip(update, g)]
            else:
                coef = sum((s * c).sum() for s, c in zip(update, g)) / _norm(g).square()
                g_v = [s - coef * c for s, c in zip(update, g)]
        elif per_tensor:
            update = [c + alpha * c.norm() / (v.norm() + 1e-8) * v for c, v in zip(g, g_v)]
        else:
            update = [c + alpha * _norm(g) / _norm(g_v) * v for c, v in zip(g, g_v)]
        _base_step(model, sgd, update)
        history.append(snapshot(model))
    return history


def against(history: list, reference: list) -> float:
    return max(max_diff(a, b) for a, b in zip(history, reference))


# -- the methods ------------------------------------------------------------------------------


def compare_sam(po, data: Batches, adaptive: bool) -> dict:
    def ours(**kw):
        m = make_model()
        opt = SAM(m.parameters(), torch.optim.SGD, RHO, adaptive=adaptive, **kw, **SGD_KW)
        return run(m, data, samkit_step(opt))

    def theirs():
        m = make_model()
        opt = po.SAM(m.parameters(), torch.optim.SGD, rho=RHO, adaptive=adaptive, **SGD_KW)
        return run(m, data, po_step(opt))

    result = compare(ours(), theirs())
    with float64_norms():
        result["checks"] = {F64: against(theirs()[0], ours()[0])}
        if adaptive:
            result["checks"]["... and samkit with adaptive_eta=0"] = against(
                theirs()[0], ours(adaptive_eta=0.0)[0]
            )
    return result


def compare_gsam(po, data: Batches) -> dict:
    alpha, n = 0.2, len(data)
    decay = lambda t: 1.0 - t / (2 * n)  # noqa: E731 -- lr, hence rho_t, falls to 1/2 of its peak

    def ours():
        m = make_model()
        opt = GSAM(m.parameters(), torch.optim.SGD, RHO, alpha=alpha, rho_min=0.0, **SGD_KW)
        sched = torch.optim.lr_scheduler.LambdaLR(opt.base_optimizer, decay)

        def step(x, y, closure):
            opt.step(closure)
            sched.step()

        return run(m, data, step)

    def theirs():
        m = make_model()
        base = torch.optim.SGD(m.parameters(), **SGD_KW)
        sched = torch.optim.lr_scheduler.LambdaLR(base, decay)
        rho_t = po.ProportionScheduler(sched, max_lr=LR, min_lr=0.0, max_value=RHO, min_value=0.0)
        opt = po.GSAM(m.parameters(), base, m, rho_t, alpha=alpha)

        def step(x, y, closure):
            opt.set_closure(F.cross_entropy, x, y)
            opt.step()
            sched.step()
            opt.update_rho_t()  # after every scheduler step, or rho_t stays where it was

        return run(m, data, step)

    result = compare(ours(), theirs())
    with float64_norms():
        result["checks"] = {F64: against(theirs()[0], ours()[0])}
    return result


def compare_wsam(po, data: Batches, decouple: bool) -> dict:
    def ours():
        m = make_model()
        opt = WSAM(m.parameters(), torch.optim.SGD, RHO, gamma=0.9, decouple=decouple, **SGD_KW)
        return run(m, data, samkit_step(opt))

    def theirs():
        m = make_model()
        opt = po.WSAM(
            m, m.parameters(), torch.optim.SGD, rho=RHO, gamma=0.9, decouple=decouple, **SGD_KW
        )
        return run(m, data, po_step_whole(opt))

    result = compare(ours(), theirs())
    with float64_norms():
        result["checks"] = {F64: against(theirs()[0], ours()[0])}
    return result


def compare_looksam(po, data: Batches) -> dict:
    k, alpha = 2, 0.7

    def ours(single_tensor=False):
        m = make_model(single_tensor)
        opt = LookSAM(m.parameters(), torch.optim.SGD, RHO, k=k, alpha=alpha, **SGD_KW)
        return run(m, data, samkit_step(opt))

    def theirs(single_tensor=False):
        m = make_model(single_tensor)
        opt = po.LookSAM(m.parameters(), torch.optim.SGD, rho=RHO, k=k, alpha=alpha, **SGD_KW)
        return run(m, data, po_step(opt))

    result = compare(ours(), theirs())
    with float64_norms():
        result["checks"] = {
            F64: against(theirs()[0], ours()[0]),
            "samkit against the whole-vector rule (reference)": against(
                ours()[0], looksam_reference(data, k, alpha, per_tensor=False)
            ),
            "pytorch_optimizer (norm in float64) against the per-tensor rule (reference)": against(
                theirs()[0], looksam_reference(data, k, alpha, per_tensor=True)
            ),
            "one parameter tensor, where the rules coincide (left: its 1e-8 on ||g_v||)": against(
                ours(True)[0], theirs(True)[0]
            ),
        }
    return result


def compare_fsam(po, data: Batches, sigma: float) -> dict:
    lmbda = 0.9

    def ours():
        m = make_model()
        opt = FriendlySAM(m.parameters(), torch.optim.SGD, RHO, sigma=sigma, lmbda=lmbda, **SGD_KW)
        return run(m, data, samkit_step(opt))

    def theirs():
        m = make_model()
        opt = po.FriendlySAM(
            m.parameters(), torch.optim.SGD, rho=RHO, sigma=sigma, lmbda=lmbda, **SGD_KW
        )
        return run(m, data, po_step(opt))

    result = compare(ours(), theirs())
    with float64_norms():
        result["checks"] = {
            F64: against(theirs()[0], ours()[0]),
            "samkit against the paper's update (reference)": against(
                ours()[0], fsam_reference(data, sigma, lmbda, authors=False)
            ),
            "pytorch_optimizer (norm in float64) against the authors' code (reference)": against(
                theirs()[0], fsam_reference(data, sigma, lmbda, authors=True)
            ),
        }
    return result


def check_bsam(po, data: Batches) -> dict:
    """bSAM: after one step with a learning rate of 1e-12 and negligible noise (num_data 1e12),
    the weights should be where they were (to ~1e-12); they are w + rho g / s (s = 1 at first)."""
    m = make_model()
    before = snapshot(m)
    opt = po.BSAM(m.parameters(), num_data=10**12, lr=1e-12, rho=RHO, weight_decay=0.0)
    x, y = data[0]
    g = _grads(m, x, y)

    def closure():
        m.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        return loss

    closure()  # its state is made for the parameters that have a gradient when step() starts
    opt.step(closure)
    moved = max_diff(snapshot(m), before)
    expected = max((RHO * gi).abs().max().item() for gi in g)
    return {"max_abs_weight_change_with_lr_1e-12": moved, "max_abs_rho_g": expected}


EXPLANATIONS = {
    "sam": (
        "both",
        "Both compute Foret et al.'s e = rho g / ||g|| (Eq. 2) and restore w by copy. "
        "The residual difference is precision: pytorch_optimizer's get_global_gradient_norm "
        "casts the per-tensor norms to float32, so in float64 its e carries a ~1e-8 relative "
        "error; with that norm taken in float64 the two agree to rounding (check).",
    ),
    "asam": (
        "samkit",
        "ASAM (Kwon et al. 2021) normalises with T_w = |w| + eta (eta = 0.01 in the "
        "authors' code, SamsungLabs/ASAM); samkit uses it (adaptive_eta=0.01), "
        "pytorch_optimizer uses T = |w| (eta = 0, as davda54/sam), so a weight at 0 is never "
        "perturbed. With samkit's adaptive_eta=0 (and pytorch_optimizer's norm in float64) they "
        "agree (check). Neither restricts T to the weight matrices as the authors' code does "
        "(biases are scaled too).",
    ),
    "gsam": (
        "both",
        "Both follow Zhuang et al.'s Algorithm 1: update g_p - alpha g_perp with g_perp "
        "the part of the clean gradient orthogonal to g_p, rho_t proportional to the learning "
        "rate between rho_min and rho. The residual difference is pytorch_optimizer's float32 "
        "norm and its restore by subtraction (w + e - e, not bit-exact). pytorch_optimizer's "
        "GSAM needs the model, a ProportionScheduler and a call to update_rho_t() after every "
        "scheduler step (without it rho_t keeps its first value); samkit reads rho_t from the "
        "param group's current learning rate. Defaults differ (alpha 0.4 there, 0.2 here).",
    ),
    "wsam": (
        "both",
        "Both use Yue et al.'s g + gamma/(1 - gamma) (g_p - g): coupled, the base step "
        "on it; decoupled, the base step on g then w -= lr gamma/(1 - gamma) (g_p - g). The "
        "residual difference is pytorch_optimizer's float32 norm and restore by subtraction.",
    ),
    "looksam": (
        "samkit",
        "Liu et al.'s Algorithm 1 writes g_v = g_s - ||g_s|| cos(g, g_s) g/||g|| and "
        "the reuse g + alpha (||g||/||g_v||) g_v on the whole gradient vector; samkit does that. "
        "pytorch_optimizer computes both per parameter tensor (its own layer-wise rule, not the "
        "paper's Look-LayerSAM either) and adds 1e-8 to ||g_v||: each matches a reference of "
        "its rule, and on a one-tensor model, where the two rules coincide, they agree (checks). "
        "Cost: pytorch_optimizer's documented use (closure() then step(closure)) computes a "
        "second, redundant gradient at w on the k - 1 steps between SAM steps (its docstring "
        "says the closure recomputes at the perturbed weights, which those steps do not have), "
        "so every step takes 2 passes and LookSAM's saving is lost; samkit's step(closure) "
        "takes 1 + 1/k (passes_per_step).",
    ),
    "fsam": (
        "samkit (the paper's equation); pytorch_optimizer follows the authors' code",
        "samkit updates the moving average first, m_t = lambda m_{t-1} + (1 - lambda) g_t "
        "from m = 0, and perturbs along d_t = g_t - sigma m_t (Li et al.'s update as "
        "REFERENCE.md states it). pytorch_optimizer copies the authors' code (nblt/F-SAM, "
        "utils.py): m = g_0 and d_0 = g_0 at the first step, then d_t = g_t - sigma m_{t-1} "
        "before the average moves. The first step agrees (d_0 is parallel to g_0 in both); "
        "later ones differ. With sigma = 1 the directions are parallel for the same m_{t-1} "
        "(lambda (g - m) against g - m), so only the start of the average differs, a "
        "difference that decays as lambda^t; with sigma != 1 the directions differ at every "
        "step. Each matches a reference of its rule (checks). Defaults: lambda 0.95 here (the "
        "authors' run.sh), 0.9 there.",
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--output", type=Path, default=RESULTS, help="the JSON written")
    args = parser.parse_args(argv)
    try:
        import pytorch_optimizer as po
    except ImportError:
        print("pytorch_optimizer is not installed: .venv/bin/pip install pytorch_optimizer")
        return 1
    torch.set_num_threads(1)
    data = make_batches(args.steps)
    results = {
        "sam": compare_sam(po, data, adaptive=False),
        "asam": compare_sam(po, data, adaptive=True),
        "gsam": compare_gsam(po, data),
        "wsam_decoupled": compare_wsam(po, data, decouple=True),
        "wsam_coupled": compare_wsam(po, data, decouple=False),
        "looksam": compare_looksam(po, data),
        "fsam_sigma_1": compare_fsam(po, data, sigma=1.0),
        "fsam_sigma_0.5": compare_fsam(po, data, sigma=0.5),
    }
    for name, result in results.items():
        follows, why = EXPLANATIONS[name.split("_")[0]]
        result["same_update"] = result["checks"][F64] <= SAME
        result["follows_the_paper"], result["explanation"] = follows, why
    record = {
        "date": datetime.date.today().isoformat(),
        "versions": {
            "torch": torch.__version__,
            "pytorch_optimizer": metadata.version("pytorch_optimizer"),
        },
        "setup": {
            "model": "float64 MLP 8-16-16-4, tanh, 6 parameter tensors (seed 0)",
            "batches": f"{args.steps} batches of 32 (seed 1), cross-entropy",
            "base": f"torch.optim.SGD(lr={LR}, momentum={MOMENTUM})",
            "rho": RHO,
            "options": "GSAM alpha 0.2 with lr (hence rho_t) falling linearly to 1/2 of its "
            "peak; WSAM gamma 0.9; LookSAM k 2, alpha 0.7; Friendly-SAM lambda 0.9",
            "same_update": "with pytorch_optimizer's norm in float64, every weight within "
            f"{SAME:g} of samkit's after every step (its own norm is float32: the raw difference)",
        },
        "methods": results,
        "not_compared": {
            "bsam": {
                "why": "samkit has no bSAM",
                "restore": check_bsam(po, data),
                "note": "pytorch_optimizer's BSAM adds the noise (first_step) and rho g / s "
                "(second_step) to the weights and applies its update there (third_step) without "
                "removing either, so the perturbation stays in the weights: with a learning "
                "rate of 1e-12 and negligible noise a step moves the weights by rho g. bSAM "
                "(Moellenhoff & Khan 2023) evaluates the gradient at the perturbed point and "
                "updates the unperturbed mean.",
            },
            "samkit only": "ESAM, SAM-ON, AE-SAM, RST, late-phase SAM, Momentum-SAM",
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    width = max(map(len, results))
    for name, r in results.items():
        passes = r["passes_per_step"]
        print(
            f"{name:<{width}}  max |dw| {r['max_abs_weight_diff']:.2e}  "
            f"{'same update' if r['same_update'] else 'DIFFERENT UPDATE'}  "
            f"passes samkit {passes['samkit']} "
            f"pytorch_optimizer {passes['pytorch_optimizer']}"
        )
        for check, value in r["checks"].items():
            print(f"{'':<{width}}    {check}: {value:.2e}")
    bsam = record["not_compared"]["bsam"]["restore"]
    moved = bsam["max_abs_weight_change_with_lr_1e-12"]
    print(f"bsam: one step at lr 1e-12 moves a weight by up to {moved:.2e} (rho |g|: up to "
          f"{bsam['max_abs_rho_g']:.2e})")  # fmt: skip
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
