"""What the self-check and the benchmarks ran on: versions, device, extension build."""
from __future__ import annotations

import datetime
import importlib
import os
import platform
import sys
from typing import Dict, List

import torch

PEER_MODULES = ("open_clip", "lightly", "pytorch_metric_learning", "inf_cl", "siglip_kernel", "flash_sinkhorn")


def _version(mod: str):
    try:
        m = importlib.import_module(mod)
    except Exception:  # noqa: BLE001 - absent or broken: reported as missing
        return None
    return getattr(m, "__version__", "installed")


def _peer_version(mod: str):
    import importlib.metadata as md
    import importlib.util

    if importlib.util.find_spec(mod) is None:
        return None
    dist = {"open_clip": "open_clip_torch", "pytorch_metric_learning": "pytorch-metric-learning",
            "inf_cl": "inf_cl", "siglip_kernel": "siglip-kernel", "flash_sinkhorn": "flash-sinkhorn"}.get(mod, mod)
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "installed"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores)"


def build_info() -> Dict:
    """``contrastive_ops._build_info`` as a dict (empty if the extension has none)."""
    try:
        mod = importlib.import_module("contrastive_ops._build_info")
    except ImportError:
        return {}
    except Exception as e:  # noqa: BLE001 - a broken build is reported, not hidden
        return {"error": f"{type(e).__name__}: {e}"}
    for fn in ("as_dict", "build_info", "info"):
        if callable(getattr(mod, fn, None)):
            try:
                return dict(getattr(mod, fn)())
            except Exception:  # noqa: BLE001
                pass
    return {k: (v if isinstance(v, (str, int, float, bool, type(None), list, tuple, dict)) else repr(v))
            for k, v in vars(mod).items() if not k.startswith("_") and not callable(v)
            and not isinstance(v, type(sys))}


def environment(device: torch.device) -> Dict:
    import contrastive_ops as co

    device = torch.device(device)
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "contrastive_ops": co.__version__,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "torch_threads": torch.get_num_threads(),
        "device": {"type": device.type, "name": device_name(device)},
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
        "build_info": build_info(),
        "peers": {m: _peer_version(m) for m in PEER_MODULES},
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["device"].update(capability=f"{p.major}.{p.minor}", memory_bytes=int(p.total_memory),
                             multiprocessors=p.multi_processor_count)
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def format_environment(env: Dict, backends: Dict) -> List[str]:
    lines = [
        f"contrastive_ops {env['contrastive_ops']}   {env['date']}",
        f"python {env['python']} on {env['platform']}",
        f"torch {env['torch']} (CUDA {env['torch_cuda'] or 'none'}), triton {env['triton'] or 'not installed'}"
        + ("  [TRITON_INTERPRET=1]" if env["triton_interpret"] else ""),
        f"CPU: {env['cpu']}, {env['cpu_count']} cores, torch threads {env['torch_threads']}",
    ]
    dev = env["device"]
    if dev["type"] == "cuda":
        lines.append(f"device: {dev['name']} (sm {dev['capability']}, {dev['memory_bytes'] / 2**30:.0f} GiB)")
    else:
        lines.append("device: cpu (no CUDA device)" if not env["cuda_available"] else "device: cpu")
    bi = env["build_info"]
    if bi:
        lines.append("extension build: " + ", ".join(f"{k}={v}" for k, v in sorted(bi.items())))
    else:
        lines.append("extension build: no contrastive_ops._build_info (extension not built)")
    peers = ", ".join(f"{k} {v}" if v else f"{k} -" for k, v in env["peers"].items())
    lines.append(f"peers: {peers}")
    lines.append("backends:")
    for name, (ok, why) in backends.items():
        lines.append(f"  {name:<10} {'yes' if ok else 'no ':<4} {why}")
    return lines


def cpu_run_meta(threads: int, **extra) -> Dict:
    """The header of a CPU benchmark's results: date, CPU model and core count, torch, threads."""
    return dict(date=datetime.date.today().isoformat(), cpu=f"{cpu_model()} ({os.cpu_count()} cores)",
                torch=torch.__version__, threads=threads, **extra)


def write_results(json_path, md_path, meta: Dict, rows: List[Dict], markdown=None, **extra) -> None:
    """A benchmark's results: ``{"meta", "rows", **extra}`` as JSON to ``json_path`` and
    ``markdown(rows, meta, *extra.values())`` to ``md_path`` (either path may be None)."""
    import json

    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(dict(meta=meta, rows=rows, **extra), f, indent=1)
    if md_path and markdown is not None:
        with open(md_path, "w") as f:
            f.write(markdown(rows, meta, *extra.values()) + "\n")
