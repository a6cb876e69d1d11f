"""The record of a ``python -m bench`` run: the markdown tables on stdout, and bench.json / bench.csv / bench.png
under --out (format in the ``bench.__main__`` docstring)."""

from __future__ import annotations

import csv
import math
import os

from . import common

RECORD_FORMAT = "moe_raw-bench/1"
CSV_FIELDS = ["kind", "shape", "op", "provider", "dtype", "ms", "us", "GB/s", "pct_copy", "speedup_vs_seed",
              "tokens_per_s", "peak_mem_GB", "max_rel_err", "note"]  # fmt: skip


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return format(v, spec)


def markdown(rows: list, copy_gbs: float | None) -> str:
    out = []
    if copy_gbs:
        out.append(f"Measured device copy bandwidth: {copy_gbs:.0f} GB/s (bytes read + written).\n")
    kern = [r for r in rows if r.get("kind") == "kernel"]
    if kern:
        out.append("| shape | op | provider | dtype | ms | GB/s | % of copy | speedup vs seed | note |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in kern:
            sp = _fmt(r.get("speedup_vs_seed"), ".2f")
            out.append(f"| {r['shape']} | {r['op']} | {r['provider']} | {r['dtype']} | {_fmt(r.get('ms'), '.3f')} | "
                       f"{_fmt(r.get('GB/s'), '.0f')} | {_fmt(r.get('pct_copy'), '.0f')}{'%' if _fmt(r.get('pct_copy'), '.0f') else ''} | "  # noqa: E501
                       f"{sp + 'x' if sp else ''} | {r.get('note', '')} |")  # fmt: skip
    host = [r for r in rows if r.get("kind") == "host"]
    if host:
        out.append("\n| shape | op | provider | host us / call |\n|---|---|---|---|")
        out += [f"| {r['shape']} | {r['op']} | {r['provider']} | {r['us']:.1f} |" for r in host]
    mem = [r for r in rows if r.get("kind") == "memory"]
    if mem:
        out.append("\n| shape | op | provider | peak GB | note |\n|---|---|---|---|---|")
        out += [f"| {r['shape']} | {r['op']} | {r['provider']} | {r['peak_mem_GB']:.3f} | {r.get('note', '')} |"
                for r in mem]  # fmt: skip
    lay = [r for r in rows if r.get("kind") == "layer"]
    if lay:
        out.append("\n| MoE layer shape | provider | dtype | ms (fwd+bwd) | tokens/s | peak GB | note |")
        out.append("|---|---|---|---|---|---|---|")
        out += [f"| {r['shape']} | {r['provider']} | {r['dtype']} | {r['ms']:.2f} | {r['tokens_per_s']:.3g} | "
                f"{r['peak_mem_GB']:.2f} | {r.get('note', '')} |" for r in lay]  # fmt: skip
    return "\n".join(out)


def write_record(out_dir: str, env: dict, args: dict, selfcheck_rows: list, rows: list,
                 copy_gbs=None, write_gbs=None) -> dict:  # fmt: skip
    """Write bench.json and bench.csv (and bench.png when matplotlib is importable) under out_dir; return paths."""
    os.makedirs(out_dir, exist_ok=True)
    record = {"format": RECORD_FORMAT, "env": env, "args": args, "copy_GBps": copy_gbs, "write_GBps": write_gbs,
              "selfcheck": selfcheck_rows, "rows": rows}  # fmt: skip
    paths = {"json": os.path.join(out_dir, "bench.json"), "csv": os.path.join(out_dir, "bench.csv")}
    common.write_json(paths["json"], record)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                        for k, v in r.items()})  # fmt: skip
    png = write_chart(os.path.join(out_dir, "bench.png"), rows, copy_gbs, env)
    if png:
        paths["png"] = png
    return paths


def _chart_provider(provider: str) -> str:
    """The chart's name of a provider: the seed's eager path is "seed" in every panel (bench_swiglu says "seed
    eager" to set it apart from torch.compile(seed))."""
    return "seed" if provider == "seed eager" else provider


def write_chart(path: str, rows: list, copy_gbs, env: dict) -> str | None:
    """Bar chart of GB/s per op and provider, one panel per shape, a dashed line at the copy bandwidth."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    kern = [r for r in rows if r.get("kind") == "kernel" and r.get("GB/s") is not None and not math.isnan(r["GB/s"])]
    if not kern:
        return None
    shapes = list(dict.fromkeys(r["shape"] for r in kern))
    providers = list(dict.fromkeys(_chart_provider(r["provider"]) for r in kern))
    colors = {p: f"C{i}" for i, p in enumerate(providers)}  # one color per provider across every panel
    fig, axes = plt.subplots(len(shapes), 1, figsize=(11, 2.8 * len(shapes) + 0.8), squeeze=False)
    width = 0.8 / max(len(providers), 1)
    for ax, shape in zip(axes[:, 0], shapes, strict=True):
        mine = [r for r in kern if r["shape"] == shape]
        ops = list(dict.fromkeys(r["op"] for r in mine))
        for i, prov in enumerate(providers):
            vals = {r["op"]: r["GB/s"] for r in mine if _chart_provider(r["provider"]) == prov}
            xs = [j + i * width for j, op in enumerate(ops) if op in vals]
            if xs:
                ax.bar(xs, [vals[op] for op in ops if op in vals], width, color=colors[prov], label=prov)
        if copy_gbs:
            ax.axhline(copy_gbs, color="k", ls="--", lw=1, label=f"device copy {copy_gbs:.0f} GB/s")
        ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(ops))])
        ax.set_xticklabels(ops, fontsize=8)
        ax.set_ylabel("GB/s")
        ax.set_title(shape, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[p]) for p in providers]
    labels = list(providers)
    if copy_gbs:
        handles.append(plt.Line2D([], [], color="k", ls="--", lw=1))
        labels.append(f"measured device copy bandwidth {copy_gbs:.0f} GB/s")
    height = fig.get_figheight()
    fig.suptitle(f"moe_raw vs seed (GB/s by the minimum-bytes model): {env.get('gpu')}, torch {env.get('torch')}, "
                 f"sha {str(env.get('git_sha'))[:10]}, {env.get('timestamp')}", fontsize=9,
                 y=1 - 0.1 / height)  # fmt: skip
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1 - 0.35 / height))  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.7 / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
