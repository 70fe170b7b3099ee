"""Prove the async tests have power: remove each wait the copy path's ordering relies on,
one at a time, run the tests on the adversarial async device, and report which removals
they catch. Every one must be caught (exit status 1 otherwise).

    PYTHONPATH=$PWD python tools/check_ordering.py [--sites a,b] [--tests tests/x.py ...]

A wait is removed without touching the library: this file is also a pytest plugin
(``-p check_ordering``) that, given ``LAZYSTREAM_REMOVE_WAIT=<site>``, turns the named device
call into a no-op when, and only when, it is made from the named function.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

# site -> (device method, the function that calls it, what the wait orders)
SITES = {
    "compute-waits-for-copy": ("compute_waits_for", "_pre_block",
                               "a streamed block's compute waits for its slot's copy"),
    "copy-waits-for-reader": ("copy_waits_for", "_issue",
                              "a copy into a slot waits for the slot's last reader"),
    "reader-waits-for-copy": ("host_waits_for", "_fill",
                              "a reader refills a staging buffer after its last copy"),
    "unload-waits-for-forward": ("wait_compute_idle", "_free",
                                 "unload waits for the last forward on every stream"),
    "cast-waits-for-scratch": ("compute_waits_for", "views",
                               "a block's casts wait for the cast scratch's last reader"),
    "resident-waits-for-copy": ("compute_waits_for", "fill",
                                "the first call waits for the resident set's copy"),
    "drain-waits-for-copies": ("host_waits_for", "drain",
                               "drain (before buffers are dropped) waits for the last copy"),
}
ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_async_device.py", "tests/test_streaming.py", "tests/test_io_ring.py"]


def pytest_configure(config) -> None:
    """As a plugin: make the removal named by LAZYSTREAM_REMOVE_WAIT."""
    site = os.environ.get("LAZYSTREAM_REMOVE_WAIT")
    if site:
        remove_wait(site)


def remove_wait(site: str) -> None:
    from lazystream.async_device import AsyncDevice

    method, caller, _ = SITES[site]
    original = getattr(AsyncDevice, method)

    def removed(self, *args):
        if sys._getframe(1).f_code.co_name == caller:
            return None
        return original(self, *args)

    setattr(AsyncDevice, method, removed)


def run(site: str | None, tests: list[str]) -> tuple[bool, str, float]:
    """(the tests passed, the first failing test, seconds)."""
    env = dict(os.environ, LAZYSTREAM_TEST_DEVICE="async", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tools'}")
    env.pop("LAZYSTREAM_REMOVE_WAIT", None)
    if site:
        env["LAZYSTREAM_REMOVE_WAIT"] = site
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "check_ordering",
                           *tests], cwd=ROOT, env=env, capture_output=True, text=True)
    failed = next((line.split()[1] for line in done.stdout.splitlines() if line.startswith("FAILED")), "")
    return done.returncode == 0, failed, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default=",".join(SITES), help="comma-separated wait sites to remove")
    parser.add_argument("--tests", nargs="*", default=TESTS)
    args = parser.parse_args()
    ok, failed, seconds = run(None, args.tests)
    print(f"with every wait: {'passed' if ok else 'FAILED ' + failed} ({seconds:.0f} s)")
    if not ok:
        return 1
    print(f"| wait removed | what it orders | caught | first failing test | s |\n|---|---|---|---|---|")
    missed = []
    for site in args.sites.split(","):
        ok, failed, seconds = run(site, args.tests)
        if ok:
            missed.append(site)
        print(f"| {site} | {SITES[site][2]} | {'no' if ok else 'yes'} | {failed or '-'} | {seconds:.0f} |", flush=True)
    if missed:
        print(f"NOT caught: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
