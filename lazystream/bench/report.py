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


def baseline(rows: Sequence[dict]) -> dict | None:
    """The row of C, the resident forward: the library's own model, or lazystream with
    every block resident where that did not fit."""
    return _find(rows, method="resident") or _find(rows, method="lazystream", placement="spread", io="mmap",
                                                   cold=False, keep=max((r["run"].get("keep") or 0 for r in _ok(rows)),
                                                                        default=0))


def resident_seconds(rows: Sequence[dict]) -> float | None:
    """C of the floor: the median of the :func:`baseline` row."""
    row = baseline(rows)
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
            "host anon peak MiB | pinned MiB | streamed MiB/call | effective GB/s | device copy GB/s | fill GB/s | "
            "stall ms | max abs diff | other load, cores |")
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
            f"{_opt(r.get('h2d_gb_per_s'))} | {_opt(r.get('fill_gb_per_s'))} | "
            f"{'—' if r.get('stall_s') is None else _ms(r['stall_s'])} | {'—' if diff is None else f'{diff:.3g}'} | "
            f"{_opt(r.get('other_load_cores'))} |")
    return "\n".join(lines)


def _opt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


@dataclass(frozen=True)
class Target:
    name: str
    figure: str  # the measured figure, with what it is compared to
    met: bool | None  # None: not measured, or not resolved (then ``unresolved`` says why)
    unresolved: str = ""

    def line(self) -> str:
        return f"| {self.name} | {self.figure} | {self.verdict} |"

    @property
    def verdict(self) -> str:
        if self.met is None:
            return f"not resolved on this machine: {self.unresolved}" if self.unresolved else "not measured"
        return "met" if self.met else "**missed**"


# A row whose slowest call took more than this many times its fastest measures the
# machine's noise, not the method: no verdict rests on it.
UNSTABLE_SPREAD = 2.0


@dataclass(frozen=True)
class Spread:
    """A row's forward times: the range and the middle half (quartiles)."""

    low: float
    q1: float
    median: float
    q3: float
    high: float

    @classmethod
    def of(cls, row: dict) -> Spread:
        times = sorted(row["forward_s"])
        n = len(times)
        return cls(times[0], times[(n - 1) // 4], row["median_s"], times[-1 - (n - 1) // 4], times[-1])


def _unstable(*rows: dict) -> str:
    for r in rows:
        s = Spread.of(r)
        if s.high > UNSTABLE_SPREAD * s.low:
            return f"{r['label']} ranged {_ms(s.low)}–{_ms(s.high)} ms, more than {UNSTABLE_SPREAD:.0f}× between its calls"
    return ""


def within(name: str, row: dict, base: dict, tol: float, what: str) -> Target:
    """Two-sided: ``row`` within ±tol of ``base``. Met when the middle halves of both rows'
    calls agree within tol; missed when even their ranges are further apart than tol, on
    either side; else (and on implausible or unstable figures) not resolved."""
    a, b = Spread.of(row), Spread.of(base)
    ratio = a.median / b.median
    figure = (f"{ratio:.3f} × {what} ({(ratio - 1) * 100:+.1f}%; {_ms(a.median)} vs {_ms(b.median)} ms, "
              f"ranges {_ms(a.low)}–{_ms(a.high)} and {_ms(b.low)}–{_ms(b.high)})")
    if why := _unstable(row, base):
        return Target(name, figure, None, why)
    if ratio < 0.5:
        return Target(name, figure, None, f"implausible: {ratio:.3f} × {what}, streaming cannot be that much faster")
    if a.low / b.high > 1 + tol or a.high / b.low < 1 - tol:
        return Target(name, figure, False)
    if 1 - tol <= a.q1 / b.q3 and a.q3 / b.q1 <= 1 + tol:
        return Target(name, figure, True)
    return Target(name, figure, None, f"the middle halves of the calls span {a.q1 / b.q3:.3f}–{a.q3 / b.q1:.3f} × "
                                      f"{what}, wider than ±{tol:.0%}")


def at_most(name: str, row: dict, base: dict, bound: float, figure: str) -> Target:
    """One-sided: the extra time of ``row`` over ``base`` is at most ``bound`` seconds.
    Met when the larger end of the middle halves' difference is within it; missed when
    even the smallest difference of their ranges exceeds it; else not resolved (also when
    ``row`` is measured faster than ``base``, which streaming cannot be)."""
    a, b = Spread.of(row), Spread.of(base)
    if why := _unstable(row, base):
        return Target(name, figure, None, why)
    if a.q3 < b.q1:
        return Target(name, figure, None, f"implausible: {row['label']} measured faster than {base['label']} "
                                          f"({_ms(a.median)} vs {_ms(b.median)} ms)")
    if a.low - b.high > bound:
        return Target(name, figure, False)
    if a.q3 - b.q1 <= bound:
        return Target(name, figure, True)
    return Target(name, figure, None, f"the difference of the middle halves, {_ms(a.q1 - b.q3)}–{_ms(a.q3 - b.q1)} "
                                      f"ms, straddles the bound of {_ms(bound)} ms")


def faster(name: str, fast: dict, slow: dict, factor: float, figure: str, also: bool = True) -> Target:
    """``fast`` at least ``factor`` × faster than ``slow``: decided only when their ranges,
    scaled, do not overlap; ``also``: a condition on other figures that must hold too."""
    a, b = Spread.of(fast), Spread.of(slow)
    if why := _unstable(fast, slow):
        return Target(name, figure, None, why)
    if not also:
        return Target(name, figure, False)
    if b.low / a.high >= factor:
        return Target(name, figure, True)
    if b.high / a.low < factor:
        return Target(name, figure, False)
    return Target(name, figure, None, f"the ranges overlap: {_ms(a.low)}–{_ms(a.high)} ms × {factor:g} against "
                                      f"{_ms(b.low)}–{_ms(b.high)} ms")


def share_of(name: str, row: dict, rate: float, share: float, what: str, compute_s: float | None) -> Target:
    """The streamed bytes of ``row`` over its forward time reach ``share`` of ``rate``
    (bytes/s): meaningful only where moving them takes longer than the compute."""
    s = Spread.of(row)
    nbytes = row["streamed_bytes"]
    figure = f"{nbytes / s.median / 1e9:.2f} GB/s = {nbytes / s.median / rate:.0%} of {what} {rate / 1e9:.2f} GB/s"
    if why := _unstable(row):
        return Target(name, figure, None, why)
    if compute_s is None or compute_s >= nbytes / rate:
        return Target(name, figure, None, "the forward's compute takes as long as moving the bytes: no rate to read")
    if nbytes / s.high > 1.05 * rate:
        return Target(name, figure, None, f"implausible: faster than the probe ({what})")
    if nbytes / s.q3 >= share * rate:
        return Target(name, figure, True)
    if nbytes / s.low < share * rate:
        return Target(name, figure, False)
    return Target(name, figure, None, "the calls' range straddles the share")


def _lazystream(rows: Sequence[dict], keep: int, io: str = "mmap", cold: bool = False) -> dict | None:
    return _find(rows, method="lazystream", keep=keep, placement="spread", io=io, cold=cold)


def cpu_targets(rows: Sequence[dict], probes: Probes, n_blocks: int) -> list[Target]:
    resident = baseline(rows)
    full, zero = _lazystream(rows, n_blocks), _lazystream(rows, 0)
    name = f"keep_gpu={n_blocks} (all) within ±2% of resident"
    out = [within(name, full, resident, 0.02, "resident") if resident and full else Target(name, "—", None)]
    name = "keep_gpu=0 overhead ≤ 1.1 × streamed bytes / page-cache read bandwidth"
    if resident and zero:
        overhead = zero["median_s"] - resident["median_s"]
        bound = zero["streamed_bytes"] / (probes.cache_read * 1e9)
        figure = (f"{_ms(overhead)} ms over resident = {overhead / bound:.2f} × S/B ({zero['streamed_bytes'] / MIB:.0f} "
                  f"MiB / {probes.cache_read:.1f} GB/s = {_ms(bound)} ms)")
        out.append(at_most(name, zero, resident, 1.1 * bound, figure))
    else:
        out.append(Target(name, "—", None))
    return out


def gpu_targets(rows: Sequence[dict], probes: Probes) -> list[Target]:
    out = []
    resident = baseline(rows)
    c = resident_seconds(rows)
    streamed = [r for r in _ok(rows) if r["run"]["method"] == "lazystream" and not r["run"]["cold"]
                and r["streamed_bytes"] and "x_floor" in r and r["run"]["io"] in ("mmap", "direct")]
    name = "forward ≤ 1.15 × floor (every warm lazystream setting)"
    if streamed and resident:
        verdicts = []
        for r in streamed:
            floor_low = max(Spread.of(resident).q1, r["transfer_floor_s"])
            floor_high = max(Spread.of(resident).high, r["transfer_floor_s"])
            s = Spread.of(r)
            if why := _unstable(r, resident):
                verdicts.append((None, why))
            elif s.q3 <= 1.15 * floor_low:
                verdicts.append((True, ""))
            elif s.low > 1.15 * floor_high:
                verdicts.append((False, ""))
            else:
                verdicts.append((None, f"{r['label']}: its range straddles 1.15 × floor"))
        worst = max(streamed, key=lambda r: r["x_floor"])
        figure = f"worst {worst['x_floor']:.2f} × ({worst['label']})"
        if any(v is False for v, _ in verdicts):
            out.append(Target(name, figure, False))
        elif all(v for v, _ in verdicts):
            out.append(Target(name, figure, True))
        else:
            out.append(Target(name, figure, None, "; ".join(w for v, w in verdicts if v is None)))
    else:
        out.append(Target(name, "—", None))
    zero, seq = _lazystream(rows, 0), _find(rows, method="cpu_offload")
    name = "≥ 3× faster than sequential offload (cpu_offload), device memory ≤ it + slots"
    if zero and seq:
        room = seq["device_peak_bytes"] + zero.get("slot_bytes", 0)
        figure = (f"{seq['median_s'] / zero['median_s']:.1f}× faster; {zero['device_peak_bytes'] / MIB:.0f} MiB vs "
                  f"{room / MIB:.0f} MiB")
        out.append(faster(name, zero, seq, 3, figure, also=zero["device_peak_bytes"] <= room))
    else:
        out.append(Target(name, "—", None))
    group = _find(rows, method="group_offload", offload_type="block_level", use_stream=True, disk=False)
    name = "at equal device memory, faster than group offloading (block_level, use_stream) with ≤ 10% of its host RAM"
    if group:
        peers = [r for r in streamed if r["device_peak_bytes"] <= 1.05 * group["device_peak_bytes"]]
        if peers:
            best = min(peers, key=lambda r: r["median_s"])
            host = best["host_anon_peak_bytes"] + best["pinned_peak_bytes"]
            group_host = group["host_anon_peak_bytes"] + group["pinned_peak_bytes"]
            figure = (f"{best['label']}: {group['median_s'] / best['median_s']:.2f}× its speed, host "
                      f"{host / MIB:.0f} MiB = {host / max(group_host, 1):.1%} of {group_host / MIB:.0f} MiB")
            out.append(faster(name, best, group, 1, figure, also=host <= 0.10 * group_host))
        else:
            out.append(Target(name, f"no lazystream setting within {group['device_peak_bytes'] / MIB:.0f} MiB", False))
    else:
        out.append(Target(name, "—", None))
    name = "streamed copy ≥ 85% of pinned host-to-device bandwidth (keep_gpu=0, page cache)"
    out.append(share_of(name, zero, probes.h2d * 1e9, 0.85, "pinned H2D", c) if zero and probes.h2d
               else Target(name, "—", None))
    cold = _lazystream(rows, 0, "direct", cold=True)
    name = "streamed read ≥ 90% of the disk's read bandwidth (keep_gpu=0, direct, cold)"
    out.append(share_of(name, cold, probes.direct_cold * 1e9, 0.90, "O_DIRECT", c) if cold
               else Target(name, "—", None))
    return out


def cpu_comparisons(rows: Sequence[dict], probes: Probes) -> list[str]:
    """What the CPU run says: streaming against resident and accelerate's disk offload,
    the staging ring against the single-thread one, and the direct against the mapped
    reads, warm and cold."""
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
    for io in ("staged", "staged-1thread"):
        ring = _lazystream(rows, 0, io)
        if ring and ring.get("fill_gb_per_s"):
            lines.append(f"- keep_gpu=0 through the staging ring ({io}): {_ms(ring['median_s'])} ms; fill "
                         f"{ring['fill_gb_per_s']:.2f} GB/s, copy into the slots {ring['h2d_gb_per_s']:.2f} GB/s "
                         f"(page-cache read probe {probes.cache_read:.2f} GB/s).")
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
