"""From result rows to what a user reads: each row against resident and against the
floor, the markdown table, the targets met or missed, and the frontier plot."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .probes import Probes

MIB = 2**20


def _ok(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok"]


def _find(rows: Sequence[dict], **match) -> dict | None:
    """The first ok row whose run has every key of ``match`` at that value."""
    return next((r for r in _ok(rows) if all(r["run"].get(k) == v for k, v in match.items())), None)


def resident_seconds(rows: Sequence[dict]) -> float | None:
    """C of the floor: the resident forward time (lazystream with every block resident
    where the library's own model did not fit)."""
    row = _find(rows, method="resident") or _find(rows, method="lazystream", placement="spread", io="mmap", cold=False,
                                                   keep=max((r["run"].get("keep") or 0 for r in _ok(rows)), default=0))
    return row["median_s"] if row else None


def add_derived(rows: list[dict], probes: Probes) -> None:
    """Add to each ok row: × resident, the floor max(C, S / min(B_read, B_h2d)), × floor,
    effective GB/s (streamed bytes over the forward time)."""
    c = resident_seconds(rows)
    for r in _ok(rows):
        s = r.get("streamed_bytes") or 0
        r["effective_gb_per_s"] = s / r["median_s"] / 1e9 if s else 0.0
        r["transfer_floor_s"] = s / (probes.transfer(r["run"]["cold"]) * 1e9)
        if c:
            r["x_resident"] = r["median_s"] / c
            r["floor_s"] = max(c, r["transfer_floor_s"])
            r["x_floor"] = r["median_s"] / r["floor_s"]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f}" if seconds >= 0.0995 else f"{seconds * 1e3:.1f}"


def table(rows: Sequence[dict]) -> str:
    head = ("| method | load s | first call s | forward ms, median (range) | × resident | × floor | device MiB | "
            "host anon peak MiB | pinned MiB | streamed MiB/call | effective GB/s | copy GB/s | max abs diff | "
            "other load, cores |")
    columns = head.count("|") - 1
    lines = [head, "|" + "---|" * columns]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['label']} | {r.get('status', 'failed')} |" + " |" * (columns - 2))
            continue
        device = f"{r['device_peak_bytes'] / MIB:.0f}" + ("" if r["device_bytes_measured"] else "*")
        cold = f" (cached {r['cached_before_call']:.0%})" if "cached_before_call" in r else ""
        processes = r.get("process_medians_s")
        spread = f" [{len(processes)} processes: {', '.join(_ms(m) for m in processes)}]" if processes else ""
        diff = r.get("max_abs_diff")
        lines.append(
            f"| {r['label']}{cold} | {r['load_s']:.2f} | {r['first_call_s']:.2f} | {_ms(r['median_s'])} "
            f"({_ms(min(r['forward_s']))}–{_ms(max(r['forward_s']))}){spread} | {_opt(r.get('x_resident'))} | "
            f"{_opt(r.get('x_floor'))} | {device} | {r['host_anon_peak_bytes'] / MIB:.0f} | "
            f"{r['pinned_peak_bytes'] / MIB:.0f} | {r['streamed_bytes'] / MIB:.0f} | {r['effective_gb_per_s']:.2f} | "
            f"{_opt(r.get('copy_gb_per_s'))} | {'—' if diff is None else f'{diff:.3g}'} | "
            f"{_opt(r.get('other_load_cores'))} |")
    return "\n".join(lines)


def _opt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


@dataclass(frozen=True)
class Target:
    name: str
    figure: str  # the measured figure, with what it is compared to
    met: bool | None  # None: not measured in this run

    def line(self) -> str:
        verdict = "not measured" if self.met is None else ("met" if self.met else "**missed**")
        return f"| {self.name} | {self.figure} | {verdict} |"


def _lazystream(rows: Sequence[dict], keep: int, io: str = "mmap", cold: bool = False) -> dict | None:
    return _find(rows, method="lazystream", keep=keep, placement="spread", io=io, cold=cold)


def cpu_targets(rows: Sequence[dict], probes: Probes, n_blocks: int) -> list[Target]:
    c = resident_seconds(rows)
    out = []
    full, zero = _lazystream(rows, n_blocks), _lazystream(rows, 0)
    if c and full:
        ratio = full["median_s"] / c
        miss = f"; missed by {(ratio - 1.02) * 100:.1f} points" if ratio > 1.02 else ""
        out.append(Target(f"keep_gpu={n_blocks} (all) within 2% of resident",
                          f"{ratio:.3f} × resident ({(ratio - 1) * 100:+.1f}%{miss})", ratio <= 1.02))
    else:
        out.append(Target(f"keep_gpu={n_blocks} (all) within 2% of resident", "—", None))
    if c and zero:
        overhead = zero["median_s"] - c
        bound = zero["streamed_bytes"] / (probes.memcpy * 1e9)
        miss = f"; missed by {(overhead - 1.1 * bound) * 1e3:.0f} ms" if overhead > 1.1 * bound else ""
        out.append(Target("keep_gpu=0 overhead ≤ 1.1 × streamed bytes / memcpy bandwidth",
                          f"{overhead * 1e3:.0f} ms over resident = {overhead / bound:.2f} × S/B "
                          f"({zero['streamed_bytes'] / MIB:.0f} MiB / {probes.memcpy:.1f} GB/s = "
                          f"{bound * 1e3:.0f} ms{miss})",
                          overhead <= 1.1 * bound))
    else:
        out.append(Target("keep_gpu=0 overhead ≤ 1.1 × streamed bytes / memcpy bandwidth", "—", None))
    return out


def gpu_targets(rows: Sequence[dict], probes: Probes) -> list[Target]:
    out = []
    streamed = [r for r in _ok(rows) if r["run"]["method"] == "lazystream" and not r["run"]["cold"]
                and r["streamed_bytes"] and "x_floor" in r]
    if streamed:
        worst = max(streamed, key=lambda r: r["x_floor"])
        out.append(Target("forward ≤ 1.15 × floor (every warm lazystream setting)",
                          f"worst {worst['x_floor']:.2f} × ({worst['label']})", worst["x_floor"] <= 1.15))
    else:
        out.append(Target("forward ≤ 1.15 × floor", "—", None))
    zero, seq = _lazystream(rows, 0), _find(rows, method="cpu_offload")
    if zero and seq:
        speed = seq["median_s"] / zero["median_s"]
        room = seq["device_peak_bytes"] + zero.get("slot_bytes", 0)
        out.append(Target("≥ 3× faster than sequential offload (cpu_offload), device memory ≤ it + slots",
                          f"{speed:.1f}× faster; {zero['device_peak_bytes'] / MIB:.0f} MiB vs {room / MIB:.0f} MiB",
                          speed >= 3 and zero["device_peak_bytes"] <= room))
    else:
        out.append(Target("≥ 3× faster than sequential offload", "—", None))
    group = _find(rows, method="group_offload", offload_type="block_level", use_stream=True, disk=False)
    if group:
        peers = [r for r in streamed if r["device_peak_bytes"] <= 1.05 * group["device_peak_bytes"]]
        if peers:
            best = min(peers, key=lambda r: r["median_s"])
            host = best["host_anon_peak_bytes"] + best["pinned_peak_bytes"]
            group_host = group["host_anon_peak_bytes"] + group["pinned_peak_bytes"]
            out.append(Target("at equal device memory, faster than group offloading (block_level, use_stream) "
                              "with ≤ 10% of its host RAM",
                              f"{best['label']}: {group['median_s'] / best['median_s']:.2f}× its speed, "
                              f"host {host / MIB:.0f} MiB = {host / group_host:.1%} of {group_host / MIB:.0f} MiB",
                              best["median_s"] < group["median_s"] and host <= 0.10 * group_host))
        else:
            out.append(Target("at equal device memory, faster than group offloading with use_stream",
                              f"no lazystream setting within {group['device_peak_bytes'] / MIB:.0f} MiB", False))
    else:
        out.append(Target("at equal device memory, faster than group offloading with use_stream", "—", None))
    if zero and probes.h2d and zero.get("copy_gb_per_s"):
        share = zero["copy_gb_per_s"] / probes.h2d
        out.append(Target("streamed copy ≥ 85% of pinned host-to-device bandwidth",
                          f"{zero['copy_gb_per_s']:.1f} GB/s = {share:.0%} of {probes.h2d:.1f} GB/s", share >= 0.85))
    else:
        out.append(Target("streamed copy ≥ 85% of pinned host-to-device bandwidth", "—", None))
    return out


def cpu_comparisons(rows: Sequence[dict], probes: Probes) -> list[str]:
    """What the CPU run says: streaming against resident, accelerate's disk offload and
    memcpy, and the direct against the mapped reads, warm and cold."""
    c = resident_seconds(rows)
    zero = _lazystream(rows, 0)
    lines = []
    if c and zero:
        lines.append(f"- keep_gpu=0 (mmap, warm): {zero['median_s'] / c:.2f} × resident "
                     f"({_ms(zero['median_s'])} ms vs {_ms(c)} ms).")
    for cold in (False, True):
        disk = _find(rows, method="device_map", keep=0, offload="disk", cold=cold)
        ours = min(filter(None, (_lazystream(rows, 0, io, cold) for io in ("mmap", "direct"))),
                   key=lambda r: r["median_s"], default=None)
        if disk and ours:
            lines.append(f"- against accelerate disk offload, keep 0, {'cold' if cold else 'warm'}: "
                         f"{disk['median_s'] / ours['median_s']:.2f}× faster "
                         f"({ours['label']}: {_ms(ours['median_s'])} ms, "
                         f"disk offload: {_ms(disk['median_s'])} ms).")
    if zero and zero.get("copy_gb_per_s"):
        lines.append(f"- copy inside the forwards: {zero['copy_gb_per_s']:.2f} GB/s = "
                     f"{zero['copy_gb_per_s'] / probes.memcpy:.0%} of the measured memcpy ({probes.memcpy:.2f} GB/s).")
    cells = []
    for io in ("mmap", "direct"):
        for cold in (False, True):
            r = _lazystream(rows, 0, io, cold)
            cells.append(f"{io} {'cold' if cold else 'warm'} {_ms(r['median_s']) if r else '—'} ms")
    lines.append("- keep_gpu=0 by read mode: " + ", ".join(cells) + ".")
    return lines


def plot(rows: Sequence[dict], path: Path, title: str) -> bool:
    """Forward time against device memory, one point per run, the frontier drawn.
    Returns False (and writes nothing) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = _ok(rows)
    fig, ax = plt.subplots(figsize=(10, 6.5))
    methods = sorted({r["run"]["method"] for r in ok})
    colors = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for method in methods:
        for cold in (False, True):
            pts = [r for r in ok if r["run"]["method"] == method and r["run"]["cold"] == cold]
            if not pts:
                continue
            ax.scatter([r["device_peak_bytes"] / MIB for r in pts], [r["median_s"] * 1e3 for r in pts],
                       label=method + (" (cold)" if cold else ""), color=colors[method],
                       facecolors="none" if cold else colors[method], s=40)
            for r in pts:
                ax.annotate(_short(r["run"]), (r["device_peak_bytes"] / MIB, r["median_s"] * 1e3), fontsize=6,
                            xytext=(3, 2), textcoords="offset points")
    frontier, best = [], float("inf")
    for r in sorted((r for r in ok if not r["run"]["cold"]), key=lambda r: (r["device_peak_bytes"], r["median_s"])):
        if r["median_s"] < best:
            best = r["median_s"]
            frontier.append((r["device_peak_bytes"] / MIB, r["median_s"] * 1e3))
    if frontier:
        ax.step(*zip(*frontier), where="post", color="gray", linewidth=0.8, linestyle="--", label="frontier (warm)")
    times = [r["median_s"] for r in ok]
    if times and max(times) / min(times) > 20:
        ax.set_yscale("log")
    measured = all(r["device_bytes_measured"] for r in ok)
    ax.set_xlabel("device memory, MiB" + ("" if measured else " (CPU: weights held)"))
    ax.set_ylabel("forward time, ms (median)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, linewidth=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _short(run: dict) -> str:
    parts = [f"k{run['keep']}" if run.get("keep") is not None else ""]
    parts += [{"first": "F", "spread": "S"}.get(run.get("placement") or "", ""), run.get("io") or ""]
    parts += [(run.get("offload_type") or "").replace("_level", ""), "str" if run.get("use_stream") else "",
              "disk" if run.get("disk") or run.get("offload") == "disk" else ""]
    return " ".join(p for p in parts if p)
