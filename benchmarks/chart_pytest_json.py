"""Charts of a pytest-benchmark JSON file (``--benchmark-json``): one PNG per benchmark function.

Usage::

    python benchmarks/chart_pytest_json.py RESULTS.json OUT_DIR [--title-suffix TEXT]

A function whose benchmarks differ by a numeric ``B`` parameter (besides the
provider) gets a line chart: median time against B per provider, log axes,
with the min-max spread as a band.  Any other function gets a horizontal bar
chart: median time per provider within each ``benchmark.group``.  Providers
are the ``provider`` (or ``prov``) parameter.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict


def _load(path):
    with open(path) as f:
        data = json.load(f)
    machine = data.get("machine_info", {})
    where = " ".join(str(machine.get(k, "")) for k in ("cpu", "node") if isinstance(machine.get(k), str))
    by_fn = defaultdict(list)
    for b in data["benchmarks"]:
        by_fn[b["name"].split("[")[0]].append(b)
    return by_fn, where


def _provider(params):
    return params.get("provider", params.get("prov"))


def _line_chart(plt, name, rows, out, suffix):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = defaultdict(list)
    for b in rows:
        p = b["params"]
        series[_provider(p)].append((p["B"], b["stats"]["median"], b["stats"]["min"], b["stats"]["max"]))
    for prov, pts in sorted(series.items()):
        pts.sort()
        xs = [p[0] for p in pts]
        line, = ax.plot(xs, [p[1] for p in pts], marker="o", label=prov)
        ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], color=line.get_color(), alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("B")
    ax.set_ylabel("time per step (s), median; band: min-max")
    group = rows[0].get("group") or name
    ax.set_title(f"{name}: {group.split(' B=')[0]} {suffix}".strip(), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out, f"{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bar_chart(plt, name, rows, out, suffix):
    groups = defaultdict(dict)
    for b in rows:
        groups[b.get("group") or name][_provider(b["params"])] = b["stats"]["median"]
    labels, values, colors = [], [], []
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    providers = sorted({p for g in groups.values() for p in g})
    for g in sorted(groups):
        for prov in providers:
            if prov in groups[g]:
                labels.append(f"{g} | {prov}")
                values.append(groups[g][prov])
                colors.append(palette[providers.index(prov) % len(palette)])
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(labels) + 1.2))
    ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("time per step (s), median")
    ax.set_title(f"{name} {suffix}".strip(), fontsize=10)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out, f"{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json")
    ap.add_argument("out")
    ap.add_argument("--title-suffix", default="")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    by_fn, _ = _load(args.json)
    for name, rows in sorted(by_fn.items()):
        params = [b.get("params") or {} for b in rows]
        if not all(_provider(p) is not None for p in params):
            continue
        keys = {k for p in params for k in p} - {"provider", "prov"}
        numeric_b = keys == {"B"} and all(isinstance(p["B"], (int, float)) for p in params)
        draw = _line_chart if numeric_b else _bar_chart
        print("wrote", draw(plt, name, rows, args.out, args.title_suffix))


if __name__ == "__main__":
    main()
