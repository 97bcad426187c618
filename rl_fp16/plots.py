"""Figures of runs read back by `rl_fp16.results`: metric curves, the pi-vs-mu scatter and the
importance-weight quantiles.

Plots are built on `matplotlib.figure.Figure` objects with the Agg canvas, not through `pyplot`, so
they touch no global matplotlib state (backend, current figure) and are not leaked in long loops.
A study's own figures build on the same blocks: `new_figure`, `save_figure`, `check_columns`,
`sorted_values`, `finite` and `matches`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np
import pandas as pd

from rl_fp16.results import RUN_KEY, STEP_KEY


def new_figure(num_panels: int, panel_size=(4.5, 3.5), **subplot_kwargs):
  """Returns (figure, list of axes) with `num_panels` side by side, on an Agg canvas."""
  fig = Figure(figsize=(panel_size[0] * num_panels, panel_size[1]), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, num_panels, squeeze=False, **subplot_kwargs)[0]
  return fig, list(axes)


def save_figure(fig: Figure, path: str | os.PathLike | None) -> Figure:
  """Saves `fig` as a PNG at `path` (folders made) unless `path` is None; returns `fig`."""
  if path is not None:
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(os.fspath(path), dpi=120)
  return fig


def check_columns(df: pd.DataFrame, names: Sequence[str | None], what: str) -> None:
  """KeyError naming `what` unless every name but None is a column of `df`."""
  missing = [name for name in names if name is not None and name not in df.columns]
  if missing:
    raise KeyError(f"{what}: columns {missing} are not in the DataFrame; it has "
                   f"{list(df.columns)}")


def sorted_values(series: pd.Series) -> list:
  """Unique values of `series` (NaN/None included once), sorted where they can be compared."""
  values = list(pd.unique(series))
  try:
    return sorted(values)
  except TypeError:
    return sorted(values, key=repr)


def finite(series: pd.Series) -> pd.Series:
  """`series` as floats, non-numeric and infinite values NaN."""
  return pd.to_numeric(series, errors="coerce").replace([np.inf, -np.inf], np.nan)


def matches(series: pd.Series, value: Any) -> pd.Series:
  """Boolean mask of `series == value`, where a missing value (None / NaN) matches missing ones."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return series.isna()
  return series.map(lambda item: item == value).astype(bool)


def plot_curves(df: pd.DataFrame, y: str, *, hue: str | None = "precision",
                col: str | None = "algorithm", x: str = "step", title: str | None = None,
                logy: bool = False, path: str | os.PathLike | None = None) -> Figure:
  """Plots metric `y` against `x`: one panel per value of `col`, one line per value of `hue`.

  Runs that share (col, hue) (e.g. seeds) are averaged at each x; a band shows their min..max.

  Args:
    df: long DataFrame, e.g. from `load_runs` (or `read_metrics` with hue=None, col=None).
    y: metric column, e.g. "reward/mean". Non-finite values are left out.
    hue: column whose values get one line each; None for one line per panel.
    col: column whose values get one panel each; None for a single panel.
    x: x-axis column.
    title: figure title; defaults to `y`.
    logy: log-scale y axis (useful for mismatch metrics spanning decades).
    path: if given, the PNG is saved there.
  Returns:
    The matplotlib Figure.
  """
  check_columns(df, [x, y, hue, col], "plot_curves")
  data = df.assign(**{y: finite(df[y])}).dropna(subset=[y])
  if data.empty:
    raise ValueError(f"plot_curves: column {y!r} has no finite values")
  col_values = sorted_values(data[col]) if col is not None else [None]
  hue_values = sorted_values(data[hue]) if hue is not None else [None]
  colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  fig, axes = new_figure(len(col_values), sharey=True)
  for ax, col_value in zip(axes, col_values):
    panel = data if col is None else data[matches(data[col], col_value)]
    for index, hue_value in enumerate(hue_values):
      lines = panel if hue is None else panel[matches(panel[hue], hue_value)]
      if lines.empty:
        continue
      stats = lines.groupby(x)[y].agg(["mean", "min", "max", "count"])
      num_runs = lines[RUN_KEY].nunique() if RUN_KEY in lines.columns else int(stats["count"].max())
      label = str(hue_value) if hue is not None else y
      if num_runs > 1:
        label += f" (n={num_runs})"
      color = colors[index % len(colors)]
      ax.plot(stats.index, stats["mean"], color=color, label=label, linewidth=1.5)
      if stats["count"].max() > 1:
        ax.fill_between(stats.index, stats["min"], stats["max"], color=color, alpha=0.2,
                        linewidth=0)
    if col is not None:
      ax.set_title(f"{col} = {col_value}")
    ax.set_xlabel(x)
    if logy:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.has_data():
      ax.legend(title=hue, fontsize="small")
  axes[0].set_ylabel(y)
  fig.suptitle(title if title is not None else y)
  return save_figure(fig, path)


def plot_seed_curves(df: pd.DataFrame, y: str, *, panel: str = "precision", seed: str = "seed",
                     x: str = STEP_KEY, smooth: int = 1, logy: bool = False,
                     path: str | os.PathLike | None = None) -> Figure:
  """Plots metric `y` against `x`, one panel per value of `panel`: each seed as a thin line and
  the median over seeds (at each x) as a thick one, all panels on one y scale.

  Args:
    df: long DataFrame with columns `panel`, `seed`, `x` and `y` (e.g. from `load_runs`).
    smooth: trailing mean over this many rows of each seed before plotting (1: raw values).
    logy: log-scale y axis.
    path: if given, the PNG is saved there.
  """
  check_columns(df, [x, y, panel, seed], "plot_seed_curves")
  data = df.assign(**{y: finite(df[y])}).dropna(subset=[y]).sort_values(x)
  if data.empty:
    raise ValueError(f"plot_seed_curves: column {y!r} has no finite values")
  panels = sorted_values(data[panel])
  colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  fig, axes = new_figure(len(panels), sharey=True)
  for index, (ax, value) in enumerate(zip(axes, panels)):
    rows = data[matches(data[panel], value)]
    color = colors[index % len(colors)]
    curves = {}
    for seed_value in sorted_values(rows[seed]):
      one = rows[matches(rows[seed], seed_value)].set_index(x)[y]
      curves[seed_value] = one.rolling(smooth, min_periods=smooth).mean() if smooth > 1 else one
      ax.plot(curves[seed_value].index, curves[seed_value], color=color, alpha=0.4,
              linewidth=0.8)
    median = pd.concat(curves, axis=1).median(axis=1)
    ax.plot(median.index, median, color=color, linewidth=2,
            label=f"median of {len(curves)} seed{'s' * (len(curves) > 1)}")
    ax.set_title(f"{panel} = {value}")
    ax.set_xlabel(x)
    if logy:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  axes[0].set_ylabel(y if smooth == 1 else f"{y} ({smooth}-step mean)")
  fig.suptitle(y)
  return save_figure(fig, path)


def plot_scatter(p_trainer: Sequence[Any], p_sampler: Sequence[Any], *, labels: Sequence[str],
                 max_points: int = 100_000, seed: int = 0,
                 path: str | os.PathLike | None = None) -> Figure:
  """Scatters the trainer's token probability pi against the sampler's mu, one panel per label.

  Tokens where the two engines agree lie on the diagonal (drawn dashed).

  Args:
    p_trainer: one array per label (any shape; flattened): pi of each sampled token, in [0, 1].
      Pass only the response tokens (apply the mask first).
    p_sampler: matching arrays of mu, the same shapes.
    labels: panel titles, e.g. ["bf16", "fp16"]. A single string means one panel, and then
      `p_trainer` / `p_sampler` may be single arrays.
    max_points: at most this many points are drawn per panel (a random subset, fixed `seed`).
    path: if given, the PNG is saved there.
  Returns:
    The matplotlib Figure.
  """
  if isinstance(labels, str):
    labels, p_trainer, p_sampler = [labels], [p_trainer], [p_sampler]
  labels = list(labels)
  if not (len(labels) == len(p_trainer) == len(p_sampler)):
    raise ValueError(f"plot_scatter: got {len(labels)} labels, {len(p_trainer)} p_trainer arrays "
                     f"and {len(p_sampler)} p_sampler arrays; they must agree")
  if not labels:
    raise ValueError("plot_scatter: labels is empty")
  rng = np.random.default_rng(seed)
  fig, axes = new_figure(len(labels), panel_size=(4.0, 4.0))
  for ax, label, pi, mu in zip(axes, labels, p_trainer, p_sampler):
    pi = np.asarray(pi, np.float64)
    mu = np.asarray(mu, np.float64)
    if pi.shape != mu.shape:
      raise ValueError(f"plot_scatter: for {label!r}, p_trainer has shape {pi.shape} but "
                       f"p_sampler has shape {mu.shape}")
    pi, mu = pi.ravel(), mu.ravel()
    keep = np.isfinite(pi) & np.isfinite(mu)
    pi, mu = pi[keep], mu[keep]
    for name, p in (("p_trainer", pi), ("p_sampler", mu)):
      if p.size and (p.min() < 0.0 or p.max() > 1.0 + 1e-6):
        raise ValueError(f"plot_scatter: {name} for {label!r} has values in [{p.min():.3g}, "
                         f"{p.max():.3g}], outside [0, 1]; pass probabilities, e.g. exp(logp)")
    diff = float(np.mean(np.abs(pi - mu))) if pi.size else math.nan
    if pi.size > max_points:
      chosen = rng.choice(pi.size, size=max_points, replace=False)
      pi, mu = pi[chosen], mu[chosen]
    ax.scatter(mu, pi, s=3, alpha=0.3, linewidths=0, rasterized=True)
    ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_title(f"{label}\nmean |pi - mu| = {diff:.2e}  (N = {int(keep.sum())})",
                 fontsize="medium")
    ax.set_xlabel("sampler probability mu")
    ax.set_ylabel("trainer probability pi")
    ax.grid(alpha=0.3)
  fig.suptitle("Token probabilities: trainer vs sampler")
  return save_figure(fig, path)


def plot_is_quantiles(df: pd.DataFrame, *, kind: str = "token", x: str = STEP_KEY,
                      path: str | os.PathLike | None = None) -> Figure:
  """Plots the importance-weight quantiles is/{kind}_weight_p1, _p50, _p99 over steps, per run.

  One panel per quantile, one line per run (the "run" column; a DataFrame without it is one run),
  with the ideal weight 1 drawn dashed. The y axis is logarithmic when the weights span more than a
  factor of 3 (as in BF16), linear otherwise (FP16 weights all sit near 1).

  Args:
    df: from `load_runs` or `read_metrics`.
    kind: "token" (rho_t = pi_old / mu per token) or "seq" (per-sequence weights).
    x: x-axis column.
    path: if given, the PNG is saved there.
  Returns:
    The matplotlib Figure.
  """
  if kind not in ("token", "seq"):
    raise ValueError(f"plot_is_quantiles: kind must be 'token' or 'seq', got {kind!r}")
  names = [f"is/{kind}_weight_p{q}" for q in (1, 50, 99)]
  check_columns(df, [x, *names], "plot_is_quantiles")
  runs = sorted_values(df[RUN_KEY]) if RUN_KEY in df.columns else [None]
  positive = pd.concat([finite(df[name]) for name in names])
  positive = positive[positive > 0]
  logy = positive.size > 0 and positive.max() > 3.0 * positive.min()
  fig, axes = new_figure(len(names), sharey=True)
  for ax, name in zip(axes, names):
    for run in runs:
      rows = df if run is None else df[df[RUN_KEY] == run]
      values = finite(rows[name])
      keep = values > 0 if logy else values.notna()  # A log axis cannot show values <= 0.
      ax.plot(rows[x][keep], values[keep], label=str(run) if run is not None else "run",
              linewidth=1.2)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
    if logy:
      ax.set_yscale("log")
    ax.set_title(name)
    ax.set_xlabel(x)
    ax.grid(alpha=0.3, which="both")
  axes[0].set_ylabel(f"{kind} importance weight pi_old / mu")
  if len(runs) > 1 or runs[0] is not None:
    axes[-1].legend(title=RUN_KEY, fontsize="small")
  fig.suptitle(f"{kind.capitalize()} importance-weight quantiles")
  return save_figure(fig, path)
