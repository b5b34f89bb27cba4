"""Tables and plots from stored results (never reruns anything).

``report(DIR)`` reads ``DIR/trials/*.json`` and the definitions stored beside them
(``DIR/definitions/<name>.toml``, copied when the run started) and writes
``report.md`` with, per experiment: each variant's measurements as the median and the range
over its seeds, the published figures beside ours, and the plots (PNG, beside it).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from balloonlab.experiments.runner import ResultStore
from balloonlab.experiments.spec import Definition, SpecError, load_definition, shipped

__all__ = ["ReportError", "group_key", "ours_value", "report", "spread"]


class ReportError(ValueError):
    """Nothing to report from (one line)."""


def group_key(params: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple((k, str(v)) for k, v in params.items())


def _label(key: Sequence[tuple[str, str]]) -> str:
    return ", ".join(f"{k}={v}" for k, v in key) or "(one variant)"


def spread(values: Sequence[Any]) -> tuple[float, float, float] | None:
    """Median, min and max (None for no values)."""
    vals = [float(v) for v in values if v is not None and not _nan(v)]
    if not vals:
        return None
    return statistics.median(vals), min(vals), max(vals)


def _nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def fmt(v: float | None) -> str:
    if v is None:
        return "–"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e5:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def fmt_spread(s: tuple[float, float, float] | None) -> str:
    if s is None:
        return "–"
    med, lo, hi = s
    if lo == hi:
        return fmt(med)
    return f"{fmt(med)} [{fmt(lo)}–{fmt(hi)}]"


def _matches(r: Mapping[str, Any], where: Mapping[str, Any]) -> bool:
    p = {**(r.get("params") or {}), "seed": r.get("seed")}
    return all(str(p.get(k)) == str(v) for k, v in where.items())


def ours_value(results: Sequence[Mapping[str, Any]], ours: Mapping[str, Any]
               ) -> tuple[float, float, float] | None:
    """Our figure for a published one: median [min–max] over seeds of ``measure`` under
    ``where`` (over ``per`` of the same trial, when given), or of the per-seed ratio of
    ``measure`` between the trials matching ``ratio[0]`` and ``ratio[1]``; times ``scale``."""
    measure = ours["measure"]
    scale = float(ours.get("scale", 1.0))
    ok = [r for r in results if r.get("status") == "ok"]
    if "ratio" in ours:
        a_f, b_f = ours["ratio"]
        a = {r["seed"]: (r.get("metrics") or {}).get(measure) for r in ok if _matches(r, a_f)}
        b = {r["seed"]: (r.get("metrics") or {}).get(measure) for r in ok if _matches(r, b_f)}
        ratios = [float(av) / float(bv) for s in a
                  if (av := a[s]) is not None and (bv := b.get(s))]
        s = spread(ratios)
    else:
        where = ours.get("where", {})
        vals = []
        for r in ok:
            if not _matches(r, where):
                continue
            m = r.get("metrics") or {}
            v = m.get(measure)
            if "per" in ours:  # a ratio within each trial
                d = m.get(ours["per"])
                v = v / d if v is not None and d else None
            vals.append(v)
        s = spread(vals)
    if s is None:
        return None
    return s[0] * scale, s[1] * scale, s[2] * scale


def _definition(out: Path, name: str) -> Definition | None:
    stored = out / "definitions" / f"{name}.toml"
    try:
        return load_definition(stored) if stored.is_file() else shipped(name)
    except SpecError:
        return None


def report(out_dir: str | Path, report_dir: str | Path | None = None) -> Path:
    """Write the report of the results in ``out_dir``; returns the report's path."""
    out = Path(out_dir)
    store = ResultStore(out)
    results = list(store.load().values())
    if not results:
        raise ReportError(f"{out}: no stored results (trials/*.json); run "
                          f"`balloonlab experiment run NAME --out {out}` first")
    store.write_tables(results)
    rdir = Path(report_dir) if report_dir is not None else out / "report"
    rdir.mkdir(parents=True, exist_ok=True)
    by_exp: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_exp.setdefault(str(r.get("experiment")), []).append(r)
    lines = ["# Experiment results", "",
             f"From `{out}` ({len(results)} trials; "
             f"{sum(r.get('status') == 'ok' for r in results)} ok). Each cell: the median "
             "over seeds, [min–max] when they differ. Regenerate with "
             f"`balloonlab experiment report {out}`.", ""]
    for name in sorted(by_exp):
        lines += _experiment_section(out, rdir, name, by_exp[name])
    p = rdir / "report.md"
    p.write_text("\n".join(lines) + "\n")
    return p


def _experiment_section(out: Path, rdir: Path, name: str, results: list[dict[str, Any]]
                        ) -> list[str]:
    defn = _definition(out, name)
    lines = [f"## {name}", ""]
    if defn is not None:
        lines += [f"**{defn.title}**", "", defn.description.strip(), ""]
    groups: dict[tuple[tuple[str, str], ...], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(group_key(r.get("params") or {}), []).append(r)
    failed = [r for r in results if r.get("status") != "ok"]
    seeds = sorted({int(r.get("seed") or 0) for r in results})
    dur = sorted({float(r.get("duration_s") or 0) for r in results})
    lines.append(f"{len(results)} trials (seeds {', '.join(map(str, seeds))}; "
                 f"{' or '.join(f'{d:g} s' for d in dur)} each); {len(failed)} failed.")
    lines.append("")
    for r in failed:
        lines.append(f"- failed: `{r.get('trial_id')}`: {r.get('error')} "
                     f"(logs: `{r.get('dir', '')}`)")
    if failed:
        lines.append("")
    ok = [r for r in results if r.get("status") == "ok"]
    if not ok:
        return lines
    cols = _columns(defn, ok)
    # One row per measurement, one column per variant (n: its trials that finished).
    keys = sorted(groups)
    oks = {k: [r for r in groups[k] if r.get("status") == "ok"] for k in keys}
    lines.append("| measurement | " + " | ".join(f"{_label(k)} (n={len(oks[k])})"
                                                 for k in keys) + " |")
    lines.append("|---|" + "---|" * len(keys))
    for c in cols:
        cells = [fmt_spread(spread([(r.get("metrics") or {}).get(c) for r in oks[k]]))
                 for k in keys]
        lines.append(f"| `{c}` | " + " | ".join(cells) + " |")
    lines.append("")
    if defn is not None and defn.published:
        lines += ["| published figure | source | confirmed | published value | ours |",
                  "|---|---|---|---|---|"]
        for p in defn.published:
            ours = fmt_spread(ours_value(ok, p.ours)) if p.ours else "–"
            lines.append(f"| {p.figure} | {p.source} | {'yes' if p.confirmed else 'no'} | "
                         f"{fmt(p.value)} | {ours} |")
        lines.append("")
        notes = [p for p in defn.published if p.note]
        for p in notes:
            lines.append(f"- {p.note}")
        if notes:
            lines.append("")
    for png in _plots(out, rdir, name, defn, ok, cols):
        lines += [f"![{png.stem}]({png.name})", ""]
    return lines


def _columns(defn: Definition | None, ok: Sequence[Mapping[str, Any]]) -> list[str]:
    metrics = set().union(*((r.get("metrics") or {}).keys() for r in ok))
    if defn is None:
        return sorted(m for m in metrics if m.startswith("host."))
    vms = [str(v.get("name")) for v in defn.topology.get("vm", [])]
    cols = [f"vm.{vm}.{m}" for m in defn.vm_measures for vm in vms]
    cols += [f"vm.{vm}.{m}" for m in defn.optional_vm for vm in vms
             if any((r.get("metrics") or {}).get(f"vm.{vm}.{m}") is not None for r in ok)]
    cols += [f"host.{m}" for m in defn.host_measures]
    return [c for c in cols if c in metrics]


def _plots(out: Path, rdir: Path, name: str, defn: Definition | None,
           ok: Sequence[Mapping[str, Any]], cols: Sequence[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    groups: dict[tuple[tuple[str, str], ...], list[Mapping[str, Any]]] = {}
    for r in ok:
        groups.setdefault(group_key(r.get("params") or {}), []).append(r)
    keys = sorted(groups)
    bar_cols = [c for c in cols if c.endswith(("modelled_throughput", "modelled_seconds"))
                ][:4] or list(cols[:2])
    if bar_cols:
        fig, axes = plt.subplots(1, len(bar_cols), figsize=(4.2 * len(bar_cols), 3.6),
                                 squeeze=False)
        for ax, c in zip(axes[0], bar_cols):
            meds, los, his = [], [], []
            for k in keys:
                s = spread([(r.get("metrics") or {}).get(c) for r in groups[k]])
                med, lo, hi = s if s is not None else (0.0, 0.0, 0.0)
                meds.append(med)
                los.append(med - lo)
                his.append(hi - med)
            ax.bar(range(len(keys)), meds, yerr=[los, his], capsize=4, color="#4c72b0")
            ax.set_xticks(range(len(keys)))
            ax.set_xticklabels(["\n".join(v for _, v in k) for k in keys], fontsize=8)
            ax.set_title(c, fontsize=9)
        fig.suptitle(f"{name}: median over seeds, bars min–max", fontsize=10)
        fig.tight_layout()
        p = rdir / f"{name}.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        made.append(p)
    if defn is not None and defn.plot.get("timeseries"):
        ts = _timeseries_plot(out, rdir, name, defn, groups, keys)
        if ts is not None:
            made.append(ts)
    return made


def _timeseries_plot(out: Path, rdir: Path, name: str, defn: Definition,
                     groups: Mapping[tuple[tuple[str, str], ...], Sequence[Mapping[str, Any]]],
                     keys: Sequence[tuple[tuple[str, str], ...]]) -> Path | None:
    """Memory per VM over time, one panel per variant (its lowest seed's trial)."""
    import matplotlib.pyplot as plt

    metric = str(defn.plot.get("metric", "backed_pages"))
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False,
                             sharey=True)
    drew = False
    for ax, k in zip(axes[0], keys):
        r = min(groups[k], key=lambda r: r.get("seed", 0))
        path = out / str(r.get("dir", "")) / "timeseries.csv"
        if not path.is_file():
            continue
        series: dict[str, tuple[list[float], list[float]]] = {}
        with path.open() as f:
            for row in csv.DictReader(f):
                try:
                    x, y = float(row["elapsed"]), float(row[metric]) * 4096 / 2**20
                except (KeyError, ValueError):
                    continue
                s = series.setdefault(row["vm"], ([], []))
                s[0].append(x)
                s[1].append(y)
        for vm, (xs, ys) in sorted(series.items()):
            ax.plot(xs, ys, label=vm)
            drew = True
        ax.set_title(f"{_label(k)} (seed {r.get('seed')})", fontsize=9)
        ax.set_xlabel("s")
        ax.set_ylabel(f"{metric} (MiB)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    p = rdir / f"{name}-timeseries.png"
    if drew:
        fig.savefig(p, dpi=90)
    plt.close(fig)
    return p if drew else None
