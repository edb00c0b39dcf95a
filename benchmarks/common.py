"""What every benchmark script shares: a description of the machine, and writing the results JSON.

Imported as ``from common import ...``: a script run as ``python benchmarks/<name>.py`` has this folder
on its path.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path


def machine() -> dict:
    """The CPU (model, cores, load: a busy shared machine inflates times), Python, and, when the script
    uses torch, its thread count and the CUDA device."""
    model = ""
    try:
        model = next(
            (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), ""
        )
    except OSError:
        pass
    info = {
        "cpu": model or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    torch = sys.modules.get("torch")  # only if the benchmark loaded it: no import cost for the others
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"  # ../shared beside the checkout


def scifact_missing(data: str | os.PathLike, needs: tuple[str, ...] = ("corpus.jsonl",), who: str = "") -> bool:
    """Whether the BEIR SciFact folder ``data`` lacks a file the benchmark needs; if so, says which on
    stderr. A checkout without ``../shared`` has no data: the benchmark then exits 0, it is not broken."""
    missing = [n for n in needs if not (Path(data) / n).is_file()]
    if missing:
        print(
            f"{who + ': ' if who else ''}SciFact not found at {data} (missing {', '.join(missing)}; it lives in "
            "../shared/data/scifact, or pass --data). Nothing to benchmark.",
            file=sys.stderr,
        )
    return bool(missing)


def write_results(result: dict, path: str | os.PathLike) -> Path:
    """Write ``result`` as indented JSON to ``path`` (folders created) and say where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return out
