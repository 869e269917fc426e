"""Companion output benchmark: a companion that prints megabytes without a newline.

    python benchmarks/companion_output.py [--mb 1,4,50,100] [--limit-s 120]

A real SSH server (asyncssh, on 127.0.0.1, in this process) stands in for the
companion; its takeoff-cache is a script that writes ``MB`` megabytes to
stderr with no line break, then prints a build report. For each size a fresh
workstation process (so its memory is its own) connects and runs
``remote_build`` with a line callback, as ``prepare --companion`` does. Prints
each size's wall time and the workstation process's peak RSS, or that it was
stopped at ``--limit-s``. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncssh  # noqa: E402
from tests.support.companion import (  # noqa: E402
    console_script,
    host_key_line,
    make_client_keys,
    make_companion,
    start_server,
)

NOISY = """import sys
chunk = "x" * (1 << 20)
for _ in range({mb}):
    sys.stderr.write(chunk)
sys.stderr.flush()
print('{{"outcome": "success", "tiles": 1}}')
"""

CLIENT = """
import asyncio, sys, time
from pathlib import Path
from takeoff_cache.companion.remote import remote_build
from takeoff_cache.companion.bringup import CompanionPaths
from takeoff_cache.companion.ssh import SSHSettings, Target, connect
port, client, tool = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
settings = SSHSettings(Target("pilot", "127.0.0.1", port), client / "known_hosts",
                       (client / "id_ed25519",), use_agent=False)
seen = [0, 0]
def line(text):
    seen[0] += 1
    seen[1] = max(seen[1], len(text))
async def main():
    async with connect(settings) as conn:
        paths = CompanionPaths("~/cache", "~/operator.key", "~/trust", "~/work", "~/inputs")
        return await remote_build(conn, paths, "r.toml", tool=tool, on_line=line)
started = time.perf_counter()
result = asyncio.run(main())
print(f"{time.perf_counter() - started:.3f} {seen[0]} {seen[1]} {result.report['outcome']}")
"""


def run_size(port: int, client: Path, tool: str, limit_s: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(port), str(client), tool],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    timer = threading.Timer(limit_s, lambda: proc.send_signal(signal.SIGKILL))
    timer.start()
    out = proc.stdout.read() if proc.stdout else ""
    err = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    timer.cancel()
    wall = time.perf_counter() - started
    peak_mib = usage.ru_maxrss / 1024
    if proc.returncode != 0:
        stopped = proc.returncode == -signal.SIGKILL
        return {
            "finished": False,
            "wall_s": round(wall, 2),
            "peak_rss_mib": round(peak_mib, 1),
            "why": "stopped at the limit" if stopped else err.strip().splitlines()[-1:],
        }
    elapsed, lines, longest, outcome = out.split()
    return {
        "finished": True,
        "wall_s": round(wall, 2),
        "remote_build_s": float(elapsed),
        "peak_rss_mib": round(peak_mib, 1),
        "lines": int(lines),
        "longest_line": int(longest),
        "outcome": outcome,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", default="1,4,50,100")
    parser.add_argument("--limit-s", type=float, default=120.0)
    args = parser.parse_args()
    sizes = [int(s) for s in args.mb.split(",")]
    with tempfile.TemporaryDirectory(prefix="companion-output-") as tmp:
        root = Path(tmp)
        client_dir = root / "workstation"
        client_key = make_client_keys(client_dir)
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        companion = make_companion(root / "companion", {"PATH": "/usr/bin:/bin"})
        for mb in sizes:
            console_script(companion.bin, f"noisy-{mb}", NOISY.format(mb=mb))
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(
            start_server(companion, host_key, client_key), loop
        ).result(30)
        (client_dir / "known_hosts").write_text(host_key_line(companion, host_key))
        results: dict[str, Any] = {}
        for mb in sizes:
            got = run_size(companion.port, client_dir, f"noisy-{mb}", args.limit_s)
            results[f"{mb}MB"] = got
            if got["finished"]:
                print(
                    f"{mb:>4} MB of stderr, no newline: {got['wall_s']:.2f} s wall"
                    f" (remote_build {got['remote_build_s']:.2f} s), peak RSS"
                    f" {got['peak_rss_mib']:.0f} MiB, {got['lines']} line(s) shown,"
                    f" longest {got['longest_line']} chars"
                )
            else:
                print(
                    f"{mb:>4} MB of stderr, no newline: not finished after"
                    f" {got['wall_s']:.0f} s ({got['why']}), peak RSS"
                    f" {got['peak_rss_mib']:.0f} MiB"
                )
        loop.call_soon_threadsafe(loop.stop)
    print(json.dumps({"benchmark": "companion_output", "limit_s": args.limit_s, **results}))


if __name__ == "__main__":
    main()
