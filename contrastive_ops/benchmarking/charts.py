"""PNG charts drawn from a results document (matplotlib, Agg backend).

One figure per loss, two panels: median fwd+bwd time vs batch size (with the
interquartile range as a band) and peak extra memory vs batch size; log axes;
one line per implementation; the device in the title.  A point that ran out of
memory or was too slow ends its line with a cross and says so in the legend.
"""
from __future__ import annotations

import os
from typing import Dict, List


def _style(impl: str, kind: str):
    fixed = {
        "reference": dict(color="black", linestyle="--", marker="o"),
        "torch.compile(reference)": dict(color="0.45", linestyle=":", marker="o"),
        "cpu": dict(color="tab:blue", marker="s"),
        "triton": dict(color="tab:red", marker="^"),
        "cuda": dict(color="tab:green", marker="D"),
    }
    if impl in fixed:
        return dict(fixed[impl], linewidth=2.2 if kind == "backend" else 1.6)
    return dict(marker="x", linestyle="-.", linewidth=1.4)


_PEER_COLORS = ("tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def _plain_log_axis(axis, base, subs=(1.0,)):
    """Log axis with plain numbers (128, 1024, 0.5) instead of powers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=base, subs=subs, numticks=12))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def write_charts(doc: Dict, out_dir: str) -> List[str]:
    """Write ``<loss>.png`` for every loss with at least one measured point; return the paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    env = doc["environment"]
    dev = env["device"]["name"]
    dtype, dim = doc["config"]["dtype"], doc["config"]["dim"]
    by_loss: Dict[str, List[dict]] = {}
    for r in doc["results"]:
        by_loss.setdefault(r["loss"], []).append(r)
    paths = []
    for loss, recs in by_loss.items():
        ok = [r for r in recs if r["status"] == "ok"]
        if not ok:
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5.2))
        passes = {r.get("pass", "fwd+bwd") for r in ok}
        what = "forward+backward" if passes == {"fwd+bwd"} else "forward (no gradient)"
        peer_i = 0
        for impl in dict.fromkeys(r["impl"] for r in recs):
            rs = sorted((r for r in recs if r["impl"] == impl), key=lambda r: r["size"])
            pts = [r for r in rs if r["status"] == "ok"]
            if not pts:
                continue
            kind = pts[0]["kind"]
            end = next((r for r in rs if r["status"] in ("oom", "too_slow", "error")), None)
            label = impl
            if end is not None:
                label += f"  ({ {'oom': 'OOM', 'too_slow': 'too slow', 'error': 'error'}[end['status']] } at N={end['size']})"
            st = _style(impl, kind)
            if "color" not in st:
                st["color"] = _PEER_COLORS[peer_i % len(_PEER_COLORS)]
                peer_i += 1
            xs = [r["size"] for r in pts]
            med = [r["time_s"]["median"] * 1e3 for r in pts]
            lo = [r["time_s"]["q25"] * 1e3 for r in pts]
            hi = [r["time_s"]["q75"] * 1e3 for r in pts]
            (line,) = ax_t.plot(xs, med, label=label, **st)
            ax_t.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
            mem = [(r["size"], r["peak_mem_bytes"] / 2**20) for r in pts if r.get("peak_mem_bytes")]
            if mem:
                ax_m.plot([m[0] for m in mem], [m[1] for m in mem], label=label, **st)
            if end is not None:
                ax_t.plot([xs[-1]], [med[-1]], marker="X", markersize=12, color=line.get_color(), linestyle="none")
        for ax, ylabel, title in ((ax_t, "median time per step (ms)", f"time, {what}"),
                                  (ax_m, "peak extra memory (MiB)", "peak memory of one step")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            _plain_log_axis(ax.xaxis, 2)
            _plain_log_axis(ax.yaxis, 10, subs=(1.0, 2.0, 5.0))
            ax.set_xlabel("batch size N")
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            ax.grid(True, which="major", alpha=0.4)
            ax.grid(True, which="minor", alpha=0.12)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8.5, loc="upper left")
        fig.suptitle(f"{loss}: {dtype}, D={dim} on {dev}", fontsize=13)
        fig.text(0.5, 0.005, f"torch {env['torch']}, contrastive_ops {env['contrastive_ops']}, "
                 f"{env['date'][:10]}; band = interquartile range; memory: {doc['methods']['memory'][:90]}",
                 ha="center", fontsize=7.5, color="0.35")
        fig.tight_layout(rect=(0, 0.03, 1, 0.95))
        path = os.path.join(out_dir, f"{loss}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
