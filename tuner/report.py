"""The dtype comparison report: which weight format to deploy at which batch size, and why.

``ComparisonResults`` is the typed record ``moe-tune compare`` fills (one tuned point per dtype
and batch size, plus what the memory model needs); ``write_reports`` turns it into report.md,
one self-contained report.html (plots embedded as base64 PNG) and report.json. The report is a
pure function of the record, so a committed report.json is everything needed to audit it.
"""

from __future__ import annotations

import base64
import html
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from tuner import report_plots, roofline
from tuner.devices import DeviceFacts
from workers.backends import BUILTIN
from workers.records import Config, DType, MoEShape

REFERENCE = DType.BF16
REPORT_FILES = ("report.md", "report.html", "report.json")
DEFAULT_MAX_REL_ERR = 0.10
"""Recommend only dtypes within 10% relative error of bf16 unless told otherwise: on Gaussian bf16
weights (a bf16 checkpoint) it admits per-tensor fp8_w8a8 (6.5–6.7%) and int8_w8a16 (1.6%), not the
4-bit formats (17–21%), whose error on real checkpoints the user must judge. On a quantized
checkpoint's grid (``tuner.compare``: gpt-oss's mxfp4) the checkpoint's own format carries only
kernel error and passes."""
SCREENED_WHY_UNKNOWN = "no full timing stands behind it"
"""What a recommendation says of a screening-only timing whose cause was not recorded."""
MIN_SIGNIFICANT_DIFFERENCE = 0.03
"""A dtype is called faster only when it wins by more than 3% of the slower latency, and by more than
the two full timings' spreads (interquartile ranges) added. Each dtype's winner is timed in its own
search, not back to back, and the same config timed in two runs on one H200 differed by up to
2.7% (docs/benchmarks.md: M=96, 357.5 vs 348.1 µs)."""

MEMORY_MODEL = (
    "Memory per GPU at batch size M = (MoE expert weights of every MoE layer, scales included) + "
    "M x (fused-MoE working buffers per token: input and output rows, per routed expert the "
    "up-GEMM output (2N), SwiGLU output (N) and down-GEMM output (K) in bf16, routing tensors, and "
    "for fp8_w8a8 the quantized activations). Working buffers are reused layer after layer. Not "
    "counted: attention and embedding weights, the KV cache, CUDA-graph pools — subtract them from "
    "the budget you pass."
)
ROOFLINE_MODEL = (
    "HBM floor = (weights of the experts the batch touches + input read + output written) / peak "
    "HBM bandwidth. Compute floor = 6·M·topk·N·K FLOPs / tensor-core peak (fp8 peak for fp8_w8a8; "
    "bf16 peak for every other dtype, whose weights are dequantized into bf16 tiles). A fraction "
    "is floor time / measured time; the larger floor names the regime."
)


@dataclass(frozen=True)
class PointResult:
    """One dtype at one batch size: the latency of the kernel the server dispatches for it on this
    GPU (``kernel`` names it; ``server_kernel`` False when the number is of another kernel, e.g.
    moe-tune's builtin one standing in; ``latency_us`` None when nothing could run it), and
    moe-tune's builtin kernel beside it (``builtin_latency_us``)."""

    dtype: DType
    M: int
    latency_us: float | None
    config: Config | None  # the tuned fused-MoE config; None for kernels without one (matmul_ogs)
    rel_err_vs_bf16: float | None  # ||out - out_bf16|| / ||out_bf16||, same kernel family and inputs; 0 for bf16
    hbm_floor_fraction: float | None  # None where the device's peaks are unknown
    compute_floor_fraction: float | None
    spread_us: float | None = None  # interquartile range of the full timing; None where unknown
    kernel: str = BUILTIN
    server_kernel: bool = True
    builtin_latency_us: float | None = None
    builtin_config: Config | None = None
    screened: bool = False  # the latency comes from a screening timing only
    screened_why: str = ""  # why no full timing stands behind it, in words (``SCREENED_WHY_UNKNOWN`` if unsaid)
    note: str = ""

    @property
    def measured(self) -> bool:
        return self.latency_us is not None

    @property
    def tokens_per_s(self) -> float | None:
        return None if self.latency_us is None else self.M / (self.latency_us * 1e-6)

    @property
    def regime(self) -> str | None:
        if self.hbm_floor_fraction is None or self.compute_floor_fraction is None:
            return None
        return roofline.FloorFractions(self.hbm_floor_fraction, self.compute_floor_fraction).regime


@dataclass(frozen=True)
class DTypeSummary:
    """What does not depend on M: the shape and the memory model's two terms."""

    shape: MoEShape
    weight_bytes_per_gpu: int
    working_bytes_per_token: int


@dataclass
class ComparisonResults:
    model: str
    layout: str  # e.g. "tp=2"
    device: str
    versions: dict[str, str]
    routing: str
    moe_layers: int
    memory_budget_bytes: int
    dtypes: dict[DType, DTypeSummary]
    points: list[PointResult] = field(default_factory=list)
    budget_ended: bool = False  # the tuning stopped at --budget-minutes: configs are the best found by then
    memory_source: str = "given"  # where memory_budget_bytes came from, in words
    configs_folder: str | None = None  # where the tuned config files were written
    config_files: list[str] = field(default_factory=list)
    max_rel_err: float = DEFAULT_MAX_REL_ERR  # the bound the recommendations were made under
    server: str = "vllm"  # whose kernel choice per dtype the latencies follow
    reference_weights: str = "random bf16 weights"  # the weights every dtype's error is measured on, in words

    def max_batch_in_budget(self, dtype: DType) -> int:
        summary = self.dtypes[dtype]
        return roofline.max_batch_in_budget(summary.weight_bytes_per_gpu, summary.working_bytes_per_token,
                                            self.memory_budget_bytes)

    def point(self, dtype: DType, M: int) -> PointResult | None:
        return next((p for p in self.points if p.dtype is dtype and p.M == M), None)

    def speedup_vs_bf16(self, point: PointResult) -> float | None:
        """bf16's latency over ``point``'s, both server-kernel numbers or both not (never a server
        kernel against moe-tune's)."""
        reference = self.point(REFERENCE, point.M)
        if reference is None or not reference.measured or not point.measured:
            return None
        if reference.server_kernel != point.server_kernel:
            return None
        return reference.latency_us / point.latency_us

    def ranked(self, point: PointResult) -> bool:
        """Whether ``point`` takes part in recommendations: a server kernel's number, and bf16's too."""
        return point.measured and point.server_kernel

    @property
    def batch_sizes(self) -> list[int]:
        return sorted({p.M for p in self.points})


def summarize_dtype(shape: MoEShape, moe_layers: int) -> DTypeSummary:
    return DTypeSummary(shape=shape, weight_bytes_per_gpu=moe_layers * roofline.weight_bytes(shape),
                        working_bytes_per_token=roofline.working_bytes_per_token(shape))


def measured_point(shape: MoEShape, M: int, latency_us: float, config: Config | None, rel_err_vs_bf16: float,
                   experts_touched: float, peaks: DeviceFacts | None, spread_us: float | None = None, *,
                   kernel: str = BUILTIN, server_kernel: bool = True, builtin_latency_us: float | None = None,
                   screened: bool = False, screened_why: str = "", note: str = "") -> PointResult:
    """A point with its floor fractions (None when ``peaks`` is None, e.g. on CPU)."""
    fractions = None if peaks is None else roofline.floor_fractions(shape, M, latency_us, peaks, experts_touched)
    return PointResult(dtype=shape.dtype, M=M, latency_us=latency_us, config=config, rel_err_vs_bf16=rel_err_vs_bf16,
                       hbm_floor_fraction=fractions.hbm if fractions else None,
                       compute_floor_fraction=fractions.compute if fractions else None, spread_us=spread_us,
                       kernel=kernel, server_kernel=server_kernel, builtin_latency_us=builtin_latency_us,
                       builtin_config=config if builtin_latency_us is not None else None, screened=screened,
                       screened_why=screened_why, note=note)


def significantly_faster(fast: PointResult, slow: PointResult) -> bool:
    """``fast`` beats ``slow`` by more than ``MIN_SIGNIFICANT_DIFFERENCE`` and the two spreads."""
    margin = max(MIN_SIGNIFICANT_DIFFERENCE * slow.latency_us, (fast.spread_us or 0.0) + (slow.spread_us or 0.0))
    return slow.latency_us - fast.latency_us > margin


@dataclass(frozen=True)
class Recommendation:
    """The fastest dtype over a run of consecutive measured batch sizes."""

    m_low: int
    m_high: int
    dtype: DType
    speedups: tuple[float, ...]  # vs bf16, one per measured M in the range (where bf16 ran)
    regimes: tuple[str, ...]
    max_rel_err: float
    first: bool
    last: bool
    tied: tuple[DType, ...] = ()
    """Eligible dtypes neither significantly faster nor significantly slower than the recommended one."""
    screened_against: tuple[tuple[str, str], ...] = ()
    """Set when the winner or a dtype it beat at some M was timed by screening only: (dtype, why no
    full timing stands behind it: the time budget, or failed full timings), named in ``text``."""

    @property
    def range_text(self) -> str:
        if self.first and self.last:
            return "every M"
        if self.first:
            return f"M ≤ {self.m_high}"
        if self.last:
            return f"M ≥ {self.m_low}"
        return f"{self.m_low} ≤ M ≤ {self.m_high}" if self.m_low != self.m_high else f"M = {self.m_low}"

    @property
    def reason(self) -> str:
        parts = []
        tied = ", ".join(d.value for d in self.tied)
        if self.dtype is REFERENCE and self.tied:
            parts.append(f"no significant difference ({tied} within the measured spread of bf16)")
        elif self.dtype is REFERENCE:
            parts.append("no other dtype is faster")
        elif self.speedups:
            low, high = min(self.speedups), max(self.speedups)
            parts.append(f"{low:.2f}× bf16" if abs(high - low) < 0.005 else f"{low:.2f}–{high:.2f}× bf16")
        if self.regimes:
            parts.append(" then ".join(dict.fromkeys(self.regimes)))
        if self.dtype is not REFERENCE:
            parts.append(f"rel. err vs bf16 ≤ {_percent(self.max_rel_err)}")
            if self.tied:
                parts.append(f"no significant difference from {tied}")
        return ", ".join(parts)

    @property
    def text(self) -> str:
        text = f"{self.range_text}: {self.dtype.value} — {self.reason}"
        if self.screened_against:
            causes: dict[str, list[str]] = {}
            for dtype, why in self.screened_against:
                causes.setdefault(why, []).append(dtype)
            text += (" (screening-only timing for " + "; ".join(f"{', '.join(dtypes)}: {why}"
                                                               for why, dtypes in causes.items())
                     + ", so this ranking is not final)")
        return text


def _eligible(results: ComparisonResults, M: int, max_rel_err: float) -> list[PointResult]:
    """Server-kernel numbers at ``M`` within ``max_rel_err`` of bf16, fastest first."""
    return sorted((p for p in results.points if p.M == M and results.ranked(p)
                   and (p.rel_err_vs_bf16 or 0.0) <= max_rel_err), key=lambda p: p.latency_us)


def choose(results: ComparisonResults, M: int, max_rel_err: float = DEFAULT_MAX_REL_ERR
           ) -> tuple[PointResult, tuple[DType, ...]] | None:
    """The dtype to deploy at ``M`` among server-kernel numbers within ``max_rel_err`` of bf16, and
    the eligible dtypes tied with it (``significantly_faster`` decides): the fastest, unless it is
    not significantly faster than bf16, which is then kept (no significant difference). None when
    bf16 has no server-kernel number at ``M`` (nothing to rank the others against) or no eligible
    dtype has one."""
    reference = results.point(REFERENCE, M)
    if reference is None or not results.ranked(reference):
        return None
    eligible = _eligible(results, M, max_rel_err)
    if not eligible:
        return None
    fastest = eligible[0]
    chosen = fastest
    if fastest is not reference and not significantly_faster(fastest, reference):
        chosen = reference
    return chosen, tuple(p.dtype for p in eligible if p is not chosen
                         and not significantly_faster(p, chosen) and not significantly_faster(chosen, p))


def recommend(results: ComparisonResults, max_rel_err: float | None = None) -> list[Recommendation]:
    """Per measured M the dtype ``choose`` picks among server-kernel numbers (``ComparisonResults.ranked``;
    within ``max_rel_err``, default the record's own ``max_rel_err``), merged into ranges of
    consecutive batch sizes with the same choice and ties; only at batch sizes where bf16 has a
    server-kernel number too. A dtype timed by screening only is named in the recommendation."""
    max_rel_err = results.max_rel_err if max_rel_err is None else max_rel_err
    runs: list[list[tuple[PointResult, tuple[DType, ...], tuple[str, ...]]]] = []
    for M in results.batch_sizes:
        chosen = choose(results, M, max_rel_err)
        if chosen is None:
            continue
        eligible = _eligible(results, M, max_rel_err)
        screened = tuple((p.dtype.value, p.screened_why or SCREENED_WHY_UNKNOWN) for p in eligible if p.screened)
        mixed = screened if len(screened) < len(eligible) else ()
        if runs and (runs[-1][-1][0].dtype, runs[-1][-1][1]) == (chosen[0].dtype, chosen[1]):
            runs[-1].append((*chosen, mixed))
        else:
            runs.append([(*chosen, mixed)])
    recommendations = []
    for index, run in enumerate(runs):
        points = [p for p, _, _ in run]
        speedups = tuple(s for s in (results.speedup_vs_bf16(p) for p in points) if s is not None)
        screened = tuple(dict.fromkeys(d for _, _, mixed in run for d in mixed))
        recommendations.append(Recommendation(
            m_low=points[0].M, m_high=points[-1].M, dtype=points[0].dtype, speedups=speedups,
            regimes=tuple(p.regime for p in points if p.regime),
            max_rel_err=max(p.rel_err_vs_bf16 or 0.0 for p in points),
            first=index == 0, last=index == len(runs) - 1, tied=run[0][1], screened_against=screened))
    return recommendations


def unranked(results: ComparisonResults) -> list[str]:
    """One line per dtype left out of the recommendations, and why."""
    lines = []
    for dtype in results.dtypes:
        points = [p for p in results.points if p.dtype is dtype]
        if points and not any(results.ranked(p) for p in points):
            why = next((p.note for p in points if p.note), "no server-kernel number")
            lines.append(f"{dtype.value} not ranked: {why}")
    return lines


# ---- document model: one list of sections, rendered to markdown and to HTML ----

@dataclass
class _Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class _Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    bullets: list[str] = field(default_factory=list)
    table: _Table | None = None
    plot: str | None = None  # key into the rendered PNGs (HTML only)


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%" if value < 0.1 else f"{100 * value:.1f}%"


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes} B"


def _sections(results: ComparisonResults, recommendations: list[Recommendation]) -> list[_Section]:
    versions = ", ".join(f"{k} {v}" for k, v in sorted(results.versions.items())) or "unknown"
    header = _Section(
        title=f"MoE dtype comparison — {results.model} ({results.layout}) on {results.device}",
        paragraphs=[f"Routing: {results.routing} · MoE layers: {results.moe_layers} · memory budget: "
                    f"{_size(results.memory_budget_bytes)} per GPU ({results.memory_source}) · versions: {versions}.",
                    f"Tuned config files: {results.configs_folder} ({', '.join(results.config_files)})."
                    if results.configs_folder else "Tuned config files: not written.",
                    "Latency is per MoE call of one layer (routing or token sort, both GEMMs, activation, "
                    f"top-k sum) in the kernel {results.server} dispatches for each dtype on this GPU (column "
                    "'kernel': backend, entry point, version, source hash), with the tuned config where the "
                    "kernel has one; tokens/s = M / latency. 'builtin µs' is moe-tune's own kernel on the same "
                    "problem. Recommendations rank only the server's kernels.",
                    f"Accuracy reference: {results.reference_weights}."]
        + (["The time budget ended the tuning: every latency is the best config found by then, not the "
            "end of the search."] if results.budget_ended else []))
    recommendation = _Section(
        title="Recommendation",
        paragraphs=[f"Among dtypes within {_percent(results.max_rel_err)} relative error of bf16 (--max-rel-err), "
                    f"the fastest per M of the server's kernels; a dtype counts as faster only by more than "
                    f"{100 * MIN_SIGNIFICANT_DIFFERENCE:.0f}% and the two timings' spreads (interquartile ranges) "
                    "added, as each dtype is timed in its own search."],
        bullets=([r.text for r in recommendations]
                 or ["no dtype within the error bound produced a server-kernel result"]) + unranked(results))
    memory = _Section(
        title="Weights and the largest batch that fits",
        paragraphs=[MEMORY_MODEL],
        table=_Table(["dtype", "shape", "weights / GPU", "working bytes / token", "largest M in budget"],
                     [[d.value, s.shape.label, _size(s.weight_bytes_per_gpu), f"{s.working_bytes_per_token:,}",
                       f"{results.max_batch_in_budget(d):,}"] for d, s in results.dtypes.items()]))
    rows = []
    for M in results.batch_sizes:
        for dtype in results.dtypes:
            point = results.point(dtype, M)
            if point is None:
                rows.append([str(M), dtype.value, "", "no correct config", "", "", "", "", "", "", "", ""])
                continue
            speedup = results.speedup_vs_bf16(point)
            builtin = "—" if point.builtin_latency_us is None else f"{point.builtin_latency_us:.1f}"
            latency = "—" if point.latency_us is None else f"{point.latency_us:.1f}" + (" (screen)" if point.screened else "")
            config = point.config.label if point.config else ("heuristic" if point.measured else "")
            rows.append([str(M), dtype.value, point.kernel or "—", latency,
                         "—" if point.tokens_per_s is None else f"{point.tokens_per_s:,.0f}",
                         "—" if speedup is None else f"{speedup:.2f}×",
                         "reference" if dtype is REFERENCE else _percent(point.rel_err_vs_bf16),
                         _percent(point.hbm_floor_fraction), _percent(point.compute_floor_fraction), config, builtin,
                         point.note])
    per_m = _Section(title="Per batch size", table=_Table(
        ["M", "dtype", "kernel", "latency µs", "tokens/s", "speed-up vs bf16", "rel. err vs bf16", "HBM floor",
         "compute floor", "config", "builtin µs", "note"], rows))
    plots = [_Section(title="Latency vs M", plot="latency"),
             _Section(title="Speed-up over bf16", plot="speedup"),
             _Section(title="Roofline fractions", paragraphs=[ROOFLINE_MODEL], plot="roofline")]
    return [header, recommendation, memory, per_m, *plots]


def _series(results: ComparisonResults, value) -> report_plots.Series:
    series: report_plots.Series = {dtype.value: [] for dtype in results.dtypes}
    for point in results.points:
        if not point.measured:
            continue
        y = value(point)
        if y is not None:
            series[point.dtype.value].append((point.M, y))
    return series


def render_plots(results: ComparisonResults) -> dict[str, bytes]:
    unknown = None
    if all(p.hbm_floor_fraction is None for p in results.points):
        unknown = f"no peak bandwidth/FLOPs known for '{results.device}'"
    return {
        "latency": report_plots.latency_plot(_series(results, lambda p: p.latency_us)),
        "speedup": report_plots.speedup_plot(_series(results, results.speedup_vs_bf16)),
        "roofline": report_plots.roofline_plot(_series(results, lambda p: p.hbm_floor_fraction),
                                               _series(results, lambda p: p.compute_floor_fraction), unknown),
    }


def render_markdown(sections: list[_Section]) -> str:
    lines = []
    for level, section in enumerate(sections):
        lines += [("# " if level == 0 else "## ") + section.title, ""]
        for paragraph in section.paragraphs:
            lines += [paragraph, ""]
        if section.bullets:
            lines += [f"- {b}" for b in section.bullets] + [""]
        if section.table:
            lines.append("| " + " | ".join(section.table.headers) + " |")
            lines.append("|" + "---|" * len(section.table.headers))
            lines += ["| " + " | ".join(row) + " |" for row in section.table.rows]
            lines.append("")
        if section.plot:
            lines += [f"_Plot `{section.plot}`: see report.html._", ""]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:0.85em;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td:nth-child(2),td:last-child{text-align:left}
img{max-width:100%;border:1px solid #eee}"""


def render_html(sections: list[_Section], plots: dict[str, bytes]) -> str:
    e = html.escape
    body = []
    for level, section in enumerate(sections):
        body.append(f"<h1>{e(section.title)}</h1>" if level == 0 else f"<h2>{e(section.title)}</h2>")
        body += [f"<p>{e(p)}</p>" for p in section.paragraphs]
        if section.bullets:
            body.append("<ul>" + "".join(f"<li>{e(b)}</li>" for b in section.bullets) + "</ul>")
        if section.table:
            head = "".join(f"<th>{e(h)}</th>" for h in section.table.headers)
            rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in section.table.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        if section.plot:
            data = base64.b64encode(plots[section.plot]).decode("ascii")
            body.append(f'<figure><img id="plot-{section.plot}" alt="{e(section.title)}" '
                        f'src="data:image/png;base64,{data}"></figure>')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(sections[0].title)}</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def to_json(results: ComparisonResults, recommendations: list[Recommendation]) -> dict:
    return {
        "model": results.model, "layout": results.layout, "device": results.device,
        "versions": results.versions, "routing": results.routing, "moe_layers": results.moe_layers,
        "budget_ended": results.budget_ended, "server": results.server,
        "memory_budget_bytes": results.memory_budget_bytes, "memory_source": results.memory_source,
        "configs_folder": results.configs_folder, "config_files": results.config_files,
        "max_rel_err": results.max_rel_err, "min_significant_difference": MIN_SIGNIFICANT_DIFFERENCE,
        "reference_weights": results.reference_weights,
        "memory_model": MEMORY_MODEL,
        "roofline_model": ROOFLINE_MODEL,
        "dtypes": {d.value: {"shape": s.shape.label, "weight_bytes_per_gpu": s.weight_bytes_per_gpu,
                             "working_bytes_per_token": s.working_bytes_per_token,
                             "max_batch_in_budget": results.max_batch_in_budget(d)}
                   for d, s in results.dtypes.items()},
        "points": [{"dtype": p.dtype.value, "M": p.M, "latency_us": p.latency_us, "tokens_per_s": p.tokens_per_s,
                    "speedup_vs_bf16": results.speedup_vs_bf16(p), "rel_err_vs_bf16": p.rel_err_vs_bf16,
                    "hbm_floor_fraction": p.hbm_floor_fraction, "compute_floor_fraction": p.compute_floor_fraction,
                    "spread_us": p.spread_us, "config": p.config.to_dict() if p.config else None,
                    "kernel": p.kernel, "server_kernel": p.server_kernel, "builtin_latency_us": p.builtin_latency_us,
                    "builtin_config": p.builtin_config.to_dict() if p.builtin_config else None,
                    "screened": p.screened, "screened_why": p.screened_why, "note": p.note} for p in results.points],
        "recommendations": [{"m_low": r.m_low, "m_high": r.m_high, "dtype": r.dtype.value,
                             "tied": [d.value for d in r.tied], "text": r.text} for r in recommendations],
        "not_ranked": unranked(results),
    }


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), 0o644)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_reports(results: ComparisonResults, out_dir: Path) -> list[Path]:
    """Write report.md, report.html and report.json into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    recommendations = recommend(results)
    sections = _sections(results, recommendations)
    contents = {
        "report.md": render_markdown(sections).encode(),
        "report.html": render_html(sections, render_plots(results)).encode(),
        "report.json": orjson.dumps(to_json(results, recommendations), option=orjson.OPT_INDENT_2),
    }
    paths = []
    for name in REPORT_FILES:
        _write_atomic(out_dir / name, contents[name])
        paths.append(out_dir / name)
    return paths
