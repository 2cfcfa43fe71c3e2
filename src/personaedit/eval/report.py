"""The eval report as a single HTML page with matplotlib plots (before/after), written atomically."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from personaedit.fileio import write_text_atomic
from personaedit.persona import MBTI_LEGEND, describe_persona


def _bar_chart(title: str, series: dict[str, dict[str, float]], ylabel: str, ylim: tuple[float, float] | None) -> str:
    """Grouped bars (one group per dimension, one bar per condition) as a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(next(iter(series.values())).keys())
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 3.4), dpi=110)
    for i, (condition, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [values[k] for k in labels], width, label=condition)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.axhline(0 if ylim and ylim[0] < 0 else ylim[0] if ylim else 0, color="grey", linewidth=0.8)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def effect_rows(effects: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(reading, mean [interval], n, verdict) for every effect of an eval report, in reading order."""
    def row(label: str, e: dict[str, Any], spec: str = "+.3f") -> tuple[str, str, str, str]:
        return label, f"{e['mean']:{spec}} [{e['low']:{spec}}, {e['high']:{spec}}]", str(e["n"]), e["verdict"]

    rows = [row(f"judge: {dim} (target)", e) for dim, e in effects["traits"]["target"].items()]
    rows += [row(f"log-prob margin: {dim} (target)", e) for dim, e in effects["logprob_margin"].items()]
    rows += [row(f"judge: {dim} (off-target)", e) for dim, e in effects["traits"]["off_target"].items()]
    if "robustness" in effects:
        rows.append(row("judge under a prompt for the opposite pole", effects["robustness"]))
    rows.append(row("plausible replies (share, base model's perplexity)", effects["plausibility"]))
    if "retention" in effects:
        rows.append(row("capability retained (edited / base accuracy)", effects["retention"], ".3f"))
    return rows


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Controllability and the PersonalityEdit metrics, one line each (when measured)."""
    lines = []
    if "controllability" in report:
        c = report["controllability"]
        means = ", ".join(f"{s:g}: {m:+.2f}" for s, m in zip(c["strengths"], c["mean_towards"]))
        lines.append(f"controllability over strengths ({c['questions']} questions each): Spearman {c['spearman']:+.2f}, "
                     f"Pearson {c['pearson']:+.2f}; mean score towards the persona {means}")
    topic = report.get("personalityedit")
    if topic and "skipped" in topic:
        lines.append(f"PersonalityEdit metrics: not measured ({topic['skipped']})")
    elif topic:
        pae = f"{topic['pae']:+.2f}" if topic.get("pae") is not None else "n/a (no --llm-judge)"
        lines.append(f"PersonalityEdit metrics on {topic['topic']!r} ({topic['pole']} {topic['trait']}): ES {topic['es']:.3f}, "
                     f"DD {topic['dd']:.4f}, Acc {topic['acc']:.1%}, TPEI {topic['tpei']:+.3f}, PAE {pae} "
                     f"({topic['coherent_pairs']}/{topic['pairs']} coherent pairs)")
    return lines


def render_html(report: dict[str, Any]) -> str:
    conditions = report["conditions"]
    expression = {name: c["expression"]["mean_scores"] for name, c in conditions.items()}
    inventory = {name: {t: v["signed"] for t, v in c["inventory"]["traits"].items()} for name, c in conditions.items()}
    charts = [
        _bar_chart("Trait expression in replies to held-out questions (text judge)", expression, "score (-1 … 1)", (-1, 1)),
        _bar_chart("Inventory self-report (IPIP-NEO-120)", inventory, "score (-1 … 1)", (-1, 1)),
    ]
    rows = []
    for name, c in conditions.items():
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{c['perplexity']:.2f}</td>"
            f"<td>{c['coherence']['coherent_share']:.0%}</td><td>{c['coherence']['mean_ngram_entropy']:.2f}</td></tr>"
        )
    effects = ""
    if "effects" in report:
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                       for r in effect_rows(report["effects"]))
        effects = ("<h2>Effects</h2><p>Paired per-item differences (edited − base) on held-out data, + = towards the "
                   "persona; the verdict is read from the 95% bootstrap interval, never from the mean.</p>"
                   f"<table><tr><th>reading</th><th>mean [95% interval]</th><th>n</th><th>verdict</th></tr>{body}</table>")
        effects += "".join(f"<p>{html.escape(line)}</p>" for line in summary_lines(report))
    kl = f"<p>KL(base ‖ edited) of next-token distributions on neutral prompts: <b>{report['kl_to_base']:.4f}</b> nats</p>" \
        if "kl_to_base" in report else ""
    edit = report.get("edit")
    edit_line = (f"{html.escape(edit['method'])} edit, persona {html.escape(describe_persona(report.get('persona')))}"
                 if edit else "no edit (base model profile)")
    sample = next(iter(conditions.values()))["expression"]["replies"][:6]
    samples = "".join(
        f"<tr><td>{html.escape(r['question'])}</td>"
        + "".join(f"<td>{html.escape(conditions[n]['expression']['replies'][i]['reply'])}</td>" for n in conditions)
        + "</tr>"
        for i, r in enumerate(sample)
    )
    headers = "".join(f"<th>{html.escape(n)}</th>" for n in conditions)
    images = "".join(f'<img alt="chart" src="data:image/png;base64,{c}">' for c in charts)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>personaedit eval · {html.escape(report['model']['spec'])}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:14px}}
img{{max-width:100%;display:block;margin:1em 0}}</style></head><body>
<h1>personaedit eval</h1>
<p>Model <b>{html.escape(report['model']['spec'])}</b> ({html.escape(report['model']['model_type'])},
fingerprint {html.escape(report['model']['fingerprint'])}) · suite <b>{html.escape(report['suite'])}</b> ·
{edit_line} · {report['data']['questions']} held-out questions · {report['seconds']} s</p>
{effects}
{images}
<p><small>{html.escape(MBTI_LEGEND)}</small></p>
<h2>Capability</h2>
<table><tr><th>condition</th><th>perplexity (neutral text)</th><th>coherent replies</th><th>mean n-gram entropy</th></tr>
{''.join(rows)}</table>{kl}
<h2>Sample replies</h2><table><tr><th>question</th>{headers}</tr>{samples}</table>
</body></html>
"""


def write_html(report: dict[str, Any], path: str | Path) -> Path:
    write_text_atomic(path, render_html(report))
    return Path(path)
