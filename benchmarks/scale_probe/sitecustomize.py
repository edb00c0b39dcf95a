"""Per-process I/O and memory notes for benchmarks/scale.py (loaded by Python at start-up from PYTHONPATH).

Only when ``INPARS_SCALE_PROBE_DIR`` is set: at exit, each Python process of the run (the launcher and
every worker) writes ``<pid>.json`` there with its argv, shard index, the bytes it read (``rchar`` of
/proc/self/io: every read() call, files and sockets; ``read_bytes``: what came from the disk, not the page
cache), its peak RSS (``VmHWM``; at exit, its RSS split into anonymous and mapped-file pages), its lifetime and CPU seconds (start-up and imports included, which a
worker's attempt record, started once the worker holds its lease, leaves out). A local workspace serves committed files in place, so the workers'
own ``bytes_read`` (downloads from a remote workspace) is 0 there: these notes say what they really read.
"""

import atexit
import json
import os
import sys
import time


def _note(folder: str) -> None:
    note = {"pid": os.getpid(), "ppid": os.getppid(), "argv": sys.argv, "shard": os.environ.get("JOB_COMPLETION_INDEX")}
    try:
        with open("/proc/self/io") as f:
            note.update({k: int(v) for k, v in (line.split(":") for line in f if line.strip())})
        with open("/proc/self/status") as f:
            status = {line.split(":")[0]: line.split()[1] for line in f if line.startswith(("VmHWM:", "RssAnon:", "RssFile:", "RssShmem:"))}
        note["vm_hwm_kb"] = int(status["VmHWM"]) if "VmHWM" in status else None
        # At exit, not at the peak: how much of the RSS is the process's own memory (anonymous) and how much
        # is mapped files (the memory-mapped store and index: page cache the kernel can take back).
        note.update({f"{k.lower().replace('rss', 'rss_')}_kb": int(v) for k, v in status.items() if k.startswith("Rss")})
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        note["exited_at"] = time.time()
        note["lifetime_seconds"] = round(note["exited_at"] - boot - started_ticks / os.sysconf("SC_CLK_TCK"), 3)
        cpu = os.times()
        note["cpu_seconds"] = round(cpu.user + cpu.system, 3)
        with open(os.path.join(folder, f"{os.getpid()}.json"), "w") as f:
            json.dump(note, f)
    except (OSError, ValueError):
        pass  # a note, never a failure


if os.environ.get("INPARS_SCALE_PROBE_DIR"):
    atexit.register(_note, os.environ["INPARS_SCALE_PROBE_DIR"])
