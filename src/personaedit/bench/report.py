"""The benchmark report from the results store: a markdown summary, PNG plots and an HTML page.

Everything is signed towards the persona: + means the judge reads the replies as closer to the
persona's poles. Shift = edited − base; robustness compares both under a system prompt asking for the
opposite pole."""

from __future__ import annotations

import html
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from personaedit.bench.runner import BASE
from personaedit.bench.store import ResultStore
from personaedit.eval.metrics import pearson, spearman
from personaedit.fileio import atomic_path, write_json_atomic, write_text_atomic
from personaedit.eval.effect import MOVED, WRONG_WAY, paired_effect
from personaedit.persona import MBTI_LEGEND, Persona


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-cell rows with shifts, per-method means at the default strength (1, else the largest), dose-response."""
    base = next((r for r in rows if r["method"] == BASE and not r["persona"]), None)
    if base is None:
        return {"cells": [], "methods": {}, "dose_response": []}
    refs = {r["persona"]: r for r in rows if r["method"] == BASE and r["persona"]}
    cells = []
    for r in rows:
        if r["method"] == BASE:
            continue
        ref = refs.get(r["persona"], {})
        cells.append({
            "method": r["method"], "persona": r["persona"], "strength": r["strength"],
            "towards": r["towards"], "shift": r["towards"] - ref.get("towards", 0.0),
            "coherent_share": r["coherent_share"], "perplexity_ratio": r["perplexity"] / base["perplexity"],
            "kl_to_base": r["kl_to_base"],
            "robust_towards": r.get("robust_towards"),
            "robust_gain": (r["robust_towards"] - ref["robust_towards"]) if "robust_towards" in r and ref else None,
            "fit_seconds": (r.get("fit") or {}).get("seconds"),
            "effect": _cell_effect(base, r),
            "fit_peak_mb": (r.get("fit") or {}).get("peak_mb_above_start"),
        })
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        by_method[c["method"]].append(c)
    methods = {}
    for method, items in by_method.items():
        strengths = {c["strength"] for c in items}
        default = 1.0 if 1.0 in strengths else max(strengths, key=abs)
        at = [c for c in items if c["strength"] == default]
        fits = [c["fit_seconds"] for c in items if c["fit_seconds"] is not None]
        peaks = [c["fit_peak_mb"] for c in items if c["fit_peak_mb"] is not None]
        methods[method] = {
            "strength": default,
            "personas": len(at),
            "measured": sum(c["effect"] is not None for c in at),
            "moved_right_way": sum((c["effect"] or {}).get("verdict") == MOVED for c in at),
            "moved_wrong_way": sum((c["effect"] or {}).get("verdict") == WRONG_WAY for c in at),
            "mean_shift": _mean([c["shift"] for c in at]),
            "coherent_share": _mean([c["coherent_share"] for c in at]),
            "perplexity_ratio": _mean([c["perplexity_ratio"] for c in at]),
            "kl_to_base": _mean([c["kl_to_base"] for c in at]),
            "robust_gain": _mean([c["robust_gain"] for c in at if c["robust_gain"] is not None]),
            "fit_seconds": _mean(fits), "fit_peak_mb": max(peaks) if peaks else None,
        }
    dose = []
    for (method, persona), items in _by(cells, "method", "persona").items():
        if len(items) >= 3:
            items.sort(key=lambda c: c["strength"])
            xs, ys = [c["strength"] for c in items], [c["towards"] for c in items]
            dose.append({"method": method, "persona": persona, "strengths": xs, "towards": ys,
                         "spearman": spearman(xs, ys), "pearson": pearson(xs, ys)})
    return {"base": {"perplexity": base["perplexity"], "coherent_share": base["coherent_share"],
                     "scores": base["scores"]},
            "cells": cells, "methods": methods, "dose_response": dose}


def _cell_effect(base: dict[str, Any], row: dict[str, Any]) -> dict[str, Any] | None:
    """The effect protocol on one cell: per question, the score towards the persona, edited − base, with its
    bootstrap interval and verdict. None for rows stored before per-question scores were kept."""
    if "item_scores" not in base or "item_scores" not in row or len(base["item_scores"]) != len(row["item_scores"]):
        return None
    persona = Persona.parse(row["persona"])
    return paired_effect([persona.towards(s) for s in base["item_scores"]],
                         [persona.towards(s) for s in row["item_scores"]]).to_dict()


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _by(cells: list[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        groups[tuple(c[k] for k in keys)].append(c)
    return groups


def _fmt(value: Any, spec: str = "+.3f") -> str:
    return "–" if value is None else format(value, spec)


def markdown(summary: dict[str, Any]) -> str:
    if not summary["cells"]:
        return ("No finished cells yet: this bench folder holds no measured method (run `personaedit bench` "
                "with this --out to fill it; it resumes).\n")
    lines = ["| method | strength | personas moved (interval above 0) | moved the wrong way | mean shift | coherent | "
             "perplexity × | KL | robustness gain | fit s | fit peak MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, m in summary["methods"].items():
        measured = m.get("measured", 0)
        lines.append(f"| {method} | {m['strength']:g} | {m['moved_right_way']}/{measured} | {m['moved_wrong_way']}/{measured} | "
                     f"{_fmt(m['mean_shift'])} | "
                     f"{_fmt(m['coherent_share'], '.0%')} | {_fmt(m['perplexity_ratio'], '.3f')} | "
                     f"{_fmt(m['kl_to_base'], '.4f')} | {_fmt(m['robust_gain'])} | {_fmt(m['fit_seconds'], '.1f')} | "
                     f"{_fmt(m['fit_peak_mb'], '.0f')} |")
    if summary["dose_response"]:
        lines += ["", "| method | persona | strengths | score towards persona | Spearman | Pearson |", "|---|---|---|---|---|---|"]
        for d in summary["dose_response"]:
            lines.append(f"| {d['method']} | {d['persona']} | {', '.join(f'{x:g}' for x in d['strengths'])} | "
                         f"{', '.join(f'{y:+.2f}' for y in d['towards'])} | {d['spearman']:+.2f} | {d['pearson']:+.2f} |")
    lines += ["", "| method | persona | strength | towards | effect [95% interval] | verdict | coherent | perplexity × | KL |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in summary["cells"]:
        e = c.get("effect")
        effect = f"{e['mean']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}]" if e else f"{c['shift']:+.3f} (no interval)"
        lines.append(f"| {c['method']} | {c['persona']} | {c['strength']:g} | {c['towards']:+.3f} | {effect} | "
                     f"{e['verdict'] if e else '–'} | "
                     f"{c['coherent_share']:.0%} | {c['perplexity_ratio']:.3f} | {c['kl_to_base']:.4f} |")
    return "\n".join(lines) + "\n"


def _figure(draw, width: float = 7.5, height: float = 3.6) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    draw(ax)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _plot_shift(summary: dict[str, Any]):
    cells = [c for c in summary["cells"] if c["strength"] == summary["methods"][c["method"]]["strength"]]
    personas = list(dict.fromkeys(c["persona"] for c in cells))
    methods = list(summary["methods"])

    def draw(ax):
        width = 0.8 / max(len(methods), 1)
        for i, method in enumerate(methods):
            shift = {c["persona"]: c["shift"] for c in cells if c["method"] == method}
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(personas))]
            ax.bar(xs, [shift.get(p, 0.0) for p in personas], width, label=method)
        ax.set_xticks(range(len(personas)), personas, rotation=25, ha="right", fontsize=8)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_ylabel("trait shift towards persona")
        ax.set_title("Trait shift per method and persona (text judge, held-out questions)")
        ax.legend(fontsize=7)

    return _figure(draw, width=max(7.5, 0.7 * len(personas) + 3))


def _plot_dose(summary: dict[str, Any]):
    def draw(ax):
        for d in summary["dose_response"]:
            ax.plot(d["strengths"], d["towards"], marker="o", label=f"{d['method']} · {d['persona']}")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xlabel("strength")
        ax.set_ylabel("score towards persona")
        ax.set_title("Dose-response")
        ax.legend(fontsize=6, ncol=2)

    return _figure(draw)


def _plot_tradeoff(summary: dict[str, Any]):
    def draw(ax):
        for (method,), items in _by(summary["cells"], "method").items():
            ax.scatter([c["shift"] for c in items], [c["perplexity_ratio"] for c in items], label=method, s=18)
        ax.axhline(1, color="grey", linewidth=0.8)
        ax.set_yscale("log")  # ratios span from 1 to hundreds once an edit is pushed too far
        ax.set_xlabel("trait shift towards persona")
        ax.set_ylabel("perplexity on neutral text (× base, log)")
        ax.set_title("Capability cost against trait shift")
        ax.legend(fontsize=7)

    return _figure(draw)


def _plot_methods(summary: dict[str, Any], key: str, ylabel: str, title: str):
    methods = [m for m, v in summary["methods"].items() if v[key] is not None]

    def draw(ax):
        ax.bar(methods, [summary["methods"][m][key] for m in methods])
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_ylabel(ylabel)
        ax.set_title(title)

    return _figure(draw, width=6, height=3.2)


PLOTS = {
    "shift.png": _plot_shift,
    "dose_response.png": lambda s: _plot_dose(s) if s["dose_response"] else None,
    "tradeoff.png": _plot_tradeoff,
    "robustness.png": lambda s: _plot_methods(s, "robust_gain", "score gain over base",
                                               "Robustness: under a prompt asking for the opposite pole"),
    "fit_seconds.png": lambda s: _plot_methods(s, "fit_seconds", "seconds", "Fit time per edit"),
    "fit_memory.png": lambda s: _plot_methods(s, "fit_peak_mb", "MB above the loaded model", "Peak memory while fitting"),
}


def write_report(out: str | Path) -> dict[str, Path]:
    """Write summary.json, report.md, plots/*.png and report.html into the bench folder `out`."""
    out = Path(out)
    with ResultStore(out / "results.sqlite") as store:
        summary = summarise(list(store.rows()))
    written = {"summary": out / "summary.json", "markdown": out / "report.md", "html": out / "report.html"}
    write_json_atomic(written["summary"], summary)
    table = markdown(summary)
    write_text_atomic(written["markdown"], table)
    images = []
    if summary["cells"]:
        for name, plot in PLOTS.items():
            png = plot(summary)
            if png:
                with atomic_path(out / "plots" / name) as tmp:
                    tmp.write_bytes(png)
                images.append(name)
    write_text_atomic(written["html"], _html(summary, table, images))
    return written


def _html(summary: dict[str, Any], table: str, images: list[str]) -> str:
    tables, current = [], []
    for line in table.splitlines() + [""]:
        if line.startswith("|") and "---" not in line:
            current.append([html.escape(c.strip()) for c in line.strip("|").split("|")])
        elif not line and current:
            tables.append(current)
            current = []
    rendered = "".join(
        "<table>" + "".join(("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in r) + "</tr>")
                            for tag, r in [("th", t[0])] + [("td", r) for r in t[1:]]) + "</table>"
        for t in tables)
    figures = "".join(f'<img alt="{html.escape(n)}" src="plots/{html.escape(n)}">' for n in images)
    if not summary["cells"]:
        rendered = f"<p><b>{html.escape(table.strip())}</b></p>"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>personaedit bench</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 7px;font-size:13px}}
img{{max-width:100%;display:block;margin:1em 0}}</style></head><body>
<h1>personaedit bench</h1>
<p>Scores are the offline text judge's, signed towards each persona (+ = closer to the persona's poles), on
held-out test-split questions; shift = edited − base. Base perplexity on neutral text:
{summary.get('base', {}).get('perplexity', float('nan')):.2f}. Personas are written as specs (trait=high|low|level);
{html.escape(MBTI_LEGEND)}</p>
{figures}{rendered}
<details><summary>summary.json</summary><pre>{html.escape(json.dumps(summary["methods"], indent=1))}</pre></details>
</body></html>
"""
