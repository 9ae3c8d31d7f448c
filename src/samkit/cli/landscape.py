"""``samkit landscape``: 1-D / 2-D loss landscapes along filter-normalised directions, and the
loss on the line between two checkpoints."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samkit.analysis.landscape import (
    evaluate_loss,
    filter_normalized_direction,
    interpolation_curve,
    loss_surface_1d,
    loss_surface_2d,
    plot_loss_contour,
    plot_loss_curve,
    plot_loss_surface_3d,
)
from samkit.cli.analysis import (
    Prepared,
    add_model_arguments,
    files_written,
    positive_float,
    report_files,
    run_command,
    source,
    write_results,
)
from samkit.cli.args import BoolFlag, CommandError, HelpFormatter, number
from samkit.cli.limits import MAX_POINTS, check_landscape_cost
from samkit.domains import MAX_SCALE, Interval
from samkit.rundir import ANALYSIS_DIR

__all__ = ["add_command", "cmd_landscape"]

_grid_points = number(int, Interval(2, MAX_POINTS))
_t_value = number(float, Interval(-MAX_SCALE, MAX_SCALE))


def add_command(sub: argparse._SubParsersAction) -> None:
    """Register ``landscape`` on the ``samkit`` parser's sub-commands."""
    p = sub.add_parser(
        "landscape",
        help="1-D / 2-D loss landscapes along filter-normalised directions; line between runs",
        description=(
            "Loss L(w + a d1) (--dims 1) or L(w + a d1 + b d2) (--dims 2) along random "
            "filter-normalised directions (Li et al. 2018), a and b in [-range, range]; with "
            "--other, the loss along the line (1-t) w_a + t w_b between two checkpoints "
            "(Goodfellow et al. 2015; then the random directions only if --dims is given). "
            "Writes PNGs (curve, contour, surface) and the raw arrays (.npz and .json)."
        ),
        formatter_class=HelpFormatter,
    )
    add_model_arguments(
        p, output_help=f"where to write the files (default: RUN_DIR/{ANALYSIS_DIR})"
    )
    s = p.add_argument_group("landscape")
    s.add_argument(
        "--dims",
        type=int,
        choices=(1, 2),
        default=None,
        help="random directions: 1 (a curve) or 2 (a surface); default 1 without --other, "
        "none with it",
    )
    s.add_argument(
        "--points",
        metavar="N",
        type=_grid_points,
        default=21,
        help="grid points per axis (and along the line)",
    )
    s.add_argument(
        "--range",
        dest="span",
        metavar="R",
        type=positive_float,
        default=1.0,
        help="the directions' coefficients run over [-R, R]",
    )
    s.add_argument(
        "--include-bias-bn",
        action=BoolFlag,
        negatives=("--no-include-bias-bn",),
        default=False,
        help="also perturb biases and BatchNorm weights (default: those get d = 0, as in Li et "
        "al.)",
    )
    s.add_argument(
        "--other",
        metavar="RUN_DIR|CHECKPOINT",
        default=None,
        help="a second checkpoint of the same model: also compute the loss on the line between "
        "the two",
    )
    s.add_argument(
        "--t-range",
        metavar=("T0", "T1"),
        type=_t_value,
        nargs=2,
        default=(-0.5, 1.5),
        help="the line's parameter t runs over [T0, T1] (t=0: RUN, t=1: --other)",
    )
    p.set_defaults(func=cmd_landscape)


def cmd_landscape(args: argparse.Namespace) -> int:
    """``samkit landscape``: see :func:`add_command`."""
    return run_command("landscape", lambda: _landscape(args), args.threads)


def _grid(lo: float, hi: float, points: int) -> Any:
    """``points`` equally spaced values, rounded to 12 decimals so 0 and 1 come out exact."""
    return np.round(np.linspace(lo, hi, points), 12) + 0.0  # + 0.0: no -0.0


def _landscape(args: argparse.Namespace) -> None:
    t0, t1 = args.t_range
    if args.other is not None and not t0 < t1:
        raise CommandError(f"--t-range {t0:g} {t1:g}: T0 must be smaller than T1")
    dims = args.dims if args.dims is not None else (None if args.other is not None else 1)
    check_landscape_cost(dims, args.points, args.other is not None, args.num_samples)
    start = time.perf_counter()
    prep = Prepared("landscape", args, other=args.other)
    other = prep.other
    name = prep.loaded.run_dir.name
    model, loss_fn, batches = prep.model, prep.loss_fn, prep.batches
    result: dict[str, Any] = {**prep.header, "loss_at_w": evaluate_loss(model, loss_fn, batches)}
    written: list[Path] = []
    out = prep.out
    with files_written(written):
        if dims is not None:
            gen = torch.Generator().manual_seed(args.seed)
            alphas = _grid(-args.span, args.span, args.points)
            d1 = filter_normalized_direction(
                model, generator=gen, include_bias_bn=args.include_bias_bn
            )
            common = {
                "directions": "filter-normalised Gaussian (Li et al. 2018), seeded with --seed",
                "include_bias_bn": args.include_bias_bn,
                "seed": args.seed,
                "range": args.span,
                "points": args.points,
            }
            if dims == 1:
                losses = loss_surface_1d(
                    model, loss_fn, batches, d1, alphas, progress=args.progress
                )
                np.savez(out / "landscape_1d.npz", alphas=alphas, losses=losses)
                written.append(out / "landscape_1d.npz")
                written.append(
                    write_results(
                        out / "landscape_1d.json",
                        {**prep.header, **common, "alphas": alphas, "losses": losses},
                    )
                )
                written.append(
                    plot_loss_curve(
                        alphas,
                        losses,
                        out / "landscape_1d.png",
                        xlabel="alpha (filter-normalised direction)",
                        title=f"loss landscape, 1-D ({name})",
                    )
                )
                result["landscape_1d"] = {"min": float(losses.min()), "max": float(losses.max())}
                print(
                    f"1-D landscape: loss {result['loss_at_w']:.6g} at w, "
                    f"{losses[0]:.6g} / {losses[-1]:.6g} at alpha = -/+{args.span:g}"
                )
            else:
                d2 = filter_normalized_direction(
                    model, generator=gen, include_bias_bn=args.include_bias_bn
                )
                betas = alphas.copy()
                surface = loss_surface_2d(
                    model, loss_fn, batches, d1, d2, alphas, betas, progress=args.progress
                )
                np.savez(out / "landscape_2d.npz", alphas=alphas, betas=betas, surface=surface)
                written.append(out / "landscape_2d.npz")
                written.append(
                    write_results(
                        out / "landscape_2d.json",
                        {
                            **prep.header,
                            **common,
                            "alphas": alphas,
                            "betas": betas,
                            "surface": surface,
                            "layout": "surface[i][j] = L(w + alphas[j] d1 + betas[i] d2)",
                        },
                    )
                )
                title = f"loss landscape, 2-D ({name})"
                written.append(
                    plot_loss_contour(
                        alphas, betas, surface, out / "landscape_2d_contour.png", title=title
                    )
                )
                written.append(
                    plot_loss_surface_3d(
                        alphas, betas, surface, out / "landscape_2d_surface.png", title=title
                    )
                )
                result["landscape_2d"] = {
                    "min": float(surface.min()),
                    "max": float(surface.max()),
                }
                print(
                    f"2-D landscape: loss {result['loss_at_w']:.6g} at w, "
                    f"from {surface.min():.6g} to {surface.max():.6g} on the grid"
                )
        if other is not None:
            ts = _grid(t0, t1, args.points)
            state_a, state_b = model.state_dict(), other.model.state_dict()
            losses = interpolation_curve(
                model, loss_fn, batches, state_a, state_b, ts, progress=args.progress
            )
            loss_b = evaluate_loss(other.model, loss_fn, batches)
            np.savez(out / "interpolation.npz", ts=ts, losses=losses)
            written.append(out / "interpolation.npz")
            written.append(
                write_results(
                    out / "interpolation.json",
                    {
                        **prep.header,
                        "other": source(other),
                        "ts": ts,
                        "losses": losses,
                        "loss_a": result["loss_at_w"],
                        "loss_b": loss_b,
                        "layout": "losses[i] = L((1 - ts[i]) w_a + ts[i] w_b), "
                        "BatchNorm statistics interpolated too",
                    },
                )
            )
            written.append(
                plot_loss_curve(
                    ts,
                    losses,
                    out / "interpolation.png",
                    xlabel="t   ((1 - t) w_a + t w_b)",
                    title=f"linear interpolation: {name} (t=0) -> {other.run_dir.name} (t=1)",
                )
            )
            result["interpolation"] = {
                "other": source(other),
                "loss_b": loss_b,
                "max_between": float(losses[(ts >= 0) & (ts <= 1)].max(initial=-np.inf)),
            }
            print(
                f"interpolation: loss {result['loss_at_w']:.6g} (t=0) -> {loss_b:.6g} (t=1), "
                f"at most {result['interpolation']['max_between']:.6g} in between"
            )
        result["elapsed_sec"] = time.perf_counter() - start
        written.insert(0, write_results(out / "landscape.json", result))
    report_files(written)
