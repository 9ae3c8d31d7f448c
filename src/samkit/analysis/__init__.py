"""Analysis of trained models and runs: Hessian spectrum (Lanczos, power iteration, SLQ density),
SAM sharpness and m-sharpness, loss landscapes, and run comparison tables and curves.

Every function takes plain objects (a model, a loss function, a list of ``(x, y)`` batches, run
directories) and returns numbers, numpy arrays or small dataclasses with ``to_dict()`` for JSON,
so a command-line front end only has to parse arguments and write files. Plot helpers draw on an
Agg canvas (matplotlib is needed only for them).
"""

from samkit.analysis.compare import (
    ComparisonReport,
    RunData,
    RunDirError,
    compare_runs,
    comparison_table,
    load_run,
    load_runs,
    plot_run_curves,
    run_row,
)
from samkit.analysis.hessian import (
    HessianEigenResult,
    HessianOperator,
    LanczosResult,
    PowerIterationResult,
    SpectralDensity,
    gauss_quadrature,
    hessian_spectral_density,
    hessian_top_eigenvalues,
    lanczos,
    plot_spectral_density,
    power_iteration_lambda_max,
    slq_density,
)
from samkit.analysis.landscape import (
    evaluate_loss,
    filter_normalize,
    filter_normalized_direction,
    interpolation_curve,
    loss_surface_1d,
    loss_surface_2d,
    plot_loss_contour,
    plot_loss_curve,
    plot_loss_surface_3d,
)
from samkit.analysis.sharpness import MSharpnessResult, SharpnessResult, m_sharpness, sharpness

__all__ = [
    "ComparisonReport",
    "HessianEigenResult",
    "HessianOperator",
    "LanczosResult",
    "MSharpnessResult",
    "PowerIterationResult",
    "RunData",
    "RunDirError",
    "SharpnessResult",
    "SpectralDensity",
    "compare_runs",
    "comparison_table",
    "evaluate_loss",
    "filter_normalize",
    "filter_normalized_direction",
    "gauss_quadrature",
    "hessian_spectral_density",
    "hessian_top_eigenvalues",
    "interpolation_curve",
    "lanczos",
    "load_run",
    "load_runs",
    "loss_surface_1d",
    "loss_surface_2d",
    "m_sharpness",
    "plot_loss_contour",
    "plot_loss_curve",
    "plot_loss_surface_3d",
    "plot_run_curves",
    "plot_spectral_density",
    "power_iteration_lambda_max",
    "run_row",
    "sharpness",
    "slq_density",
]
