"""What happened in a session, in words (`summarise`) and in one figure (`plot_session`), from a `SessionData`.

Latencies are p50 / p99 / max in ms over the rows where the stage ran (NaN rows skipped): the frames' ingest,
preprocess and forecast columns, each forecast stage's t_src -> published, and the trigger latency: controller
receive -> PUBACK (t_puback_ns - t_recv_ns) of the sent triggers.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loopcast.session.data import LATENCY_COLUMNS, SessionData, SkillTable

LABEL_WIDTH = 28


def _line(label: str, value: Any) -> str:
    return f"  {label:<{LABEL_WIDTH}} {value}"


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"


def latency_stats(values_ms: Iterable[float]) -> tuple[int, float, float, float] | None:
    """(n, p50, p99, max) of the finite values, None when there are none."""
    v = np.asarray(list(values_ms) if not isinstance(values_ms, np.ndarray) else values_ms, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    return int(v.size), float(np.percentile(v, 50)), float(np.percentile(v, 99)), float(v.max())


def seq_gaps(data: SessionData) -> tuple[int, int]:
    """(gaps, frames missing) between consecutive valid frames' seqs (a step > 1 is a drop)."""
    if data.frames is None:
        return 0, 0
    seq = data.frames.seq[data.frames.valid]
    step = np.diff(seq)
    gaps = step[step > 1]
    return int(gaps.size), int((gaps - 1).sum())


def _frame_lines(data: SessionData) -> list[str]:
    f = data.frames
    if f is None:
        return ["frames", _line("handled", "0 (no session store)")]
    rejected = Counter(f.reasons[k - 1] if k - 1 < len(f.reasons) else f"status {k}" for k in f.status[f.status > 0])
    gaps, missing = seq_gaps(data)
    return ["frames",
            _line("handled", len(f)),
            _line("valid", int(f.valid.sum())),
            _line("invalid", f"{sum(rejected.values())} ({_counts(rejected)})"),
            _line("drops (seq gaps)", f"{gaps} gaps, {missing} frames missing"),
            *_registration_lines(f.registration)]


def _registration_lines(reg: np.ndarray | None) -> list[str]:
    """Registered frames, the largest shift per axis and the lowest confidence (none without registration)."""
    if reg is None:
        return []
    reg = np.asarray(reg, dtype=np.float64).reshape(-1, 4)
    done = reg[np.isfinite(reg[:, 3])]
    if not len(done):   # registration off
        return []
    worst = np.abs(done[:, :3]).max(axis=0)
    return [_line("registered", f"{len(done)} frames; max |shift| x {worst[0]:.2f}, y {worst[1]:.2f}, "
                  f"z {worst[2]:.2f} voxels; lowest confidence {done[:, 3].min():.1f}")]


def _control_lines(data: SessionData) -> list[str]:
    recs = data.records("forecast")
    decisions = Counter(str(r.get("decision")) for r in recs)
    suppressed = Counter(str(r.get("interlock")) for r in recs if r.get("decision") == "suppressed")
    control = data.records("control")
    accepted = sum(bool(r.get("accepted")) for r in control)
    lines = ["controller",
             _line("forecasts read", len(recs)),
             _line("triggers sent", decisions.get("sent", 0)),
             _line("suppressed", f"{sum(suppressed.values())} ({_counts(suppressed)})"),
             _line("unusable forecasts", decisions.get("unusable", 0)),
             _line("control commands", f"{len(control)} ({accepted} accepted, {len(control) - accepted} refused)"),
             _line("state changes", _counts(Counter(str(r.get("event")) for r in data.records("state"))))]
    if decisions.get("publish_failed"):
        lines.append(_line("publish failed", decisions["publish_failed"]))
    if data.records("invalid"):
        lines.append(_line("invalid messages", len(data.records("invalid"))))
    return lines


def trigger_latency_ms(data: SessionData) -> np.ndarray:
    """Controller receive -> PUBACK (ms) of each sent trigger."""
    sent = [r for r in data.records("forecast") if r.get("decision") == "sent" and r.get("t_puback_ns")]
    return np.array([(int(r["t_puback_ns"]) - int(r.get("t_recv_ns") or r["t_puback_ns"])) / 1e6 for r in sent])


def _latency_lines(data: SessionData) -> list[str]:
    rows: list[tuple[str, np.ndarray]] = []
    if data.frames is not None:
        lat = np.asarray(data.frames.latency_ms, dtype=np.float64).reshape(len(data.frames), -1)
        rows += [(name, lat[:, i]) for i, name in enumerate(LATENCY_COLUMNS)]
    rows += [(s.name, np.asarray(s.latency_ms, dtype=np.float64)) for s in data.forecasts.values()]
    rows.append(("trigger", trigger_latency_ms(data)))
    lines = [f"latency (ms)  {'':<{LABEL_WIDTH - 12}} {'n':>6} {'p50':>8} {'p99':>8} {'max':>8}"]
    for name, values in rows:
        st = latency_stats(values)
        if st is not None:
            lines.append(f"  {name:<{LABEL_WIDTH}} {st[0]:>6} {st[1]:>8.2f} {st[2]:>8.2f} {st[3]:>8.2f}")
    return lines


def skill_by_lead(sk: SkillTable) -> list[tuple[int, float, float, float, float]]:
    """(lead, last rolling MAE, last rolling baseline MAE, mean MAE, mean baseline MAE) per lead."""
    out = []
    for lead in np.unique(sk.lead):
        rows = np.flatnonzero(sk.lead == lead)
        last = rows[-1]
        out.append((int(lead), float(sk.rolling_mae[last]), float(sk.rolling_baseline_mae[last]),
                    float(np.mean(sk.mae[rows])), float(np.mean(sk.baseline_mae[rows]))))
    return out


def _skill_lines(data: SessionData) -> list[str]:
    lines: list[str] = []
    for sk in data.skill.values():
        lines += [f"skill {sk.model} (MAE; rolling over {sk.window}; baseline = mean of context)",
                  f"  {'lead':>4} {'last rolling: model':>20} {'baseline':>9} {'session mean: model':>20} "
                  f"{'baseline':>9}"]
        lines += [f"  {lead:>4} {r:>20.4f} {rb:>9.4f} {m:>20.4f} {mb:>9.4f}"
                  for lead, r, rb, m, mb in skill_by_lead(sk)]
    return lines


def summarise(data: SessionData) -> str:
    """The session in plain aligned text, like a CLI summary."""
    lines = [f"session {data.run_dir.name}"]
    lines += _frame_lines(data)
    lines += ["forecasts"] + [_line(s.name, f"{len(s.seq)} published") for s in data.forecasts.values()]
    if not data.forecasts:
        lines.append(_line("published", "none recorded"))
    lines += _control_lines(data) + _latency_lines(data) + _skill_lines(data)
    if data.problems:
        lines += ["problems"] + [f"  - {p}" for p in data.problems]
    return "\n".join(lines) + "\n"


def start_record(data: SessionData) -> dict[str, Any]:
    """The audit log's start record ({} without one)."""
    recs = data.records("start")
    return recs[0] if recs else {}


def monitored_columns(data: SessionData) -> tuple[np.ndarray, str]:
    """Columns of the recorded neurons that the policy monitors, and a label; all columns when unknown."""
    monitor: Sequence[int] = start_record(data).get("monitor") or []
    cols = np.flatnonzero(np.isin(data.neurons, np.asarray(monitor, dtype=np.int64)))
    if cols.size:
        return cols, f"monitored ensemble ({cols.size} of {len(monitor)} recorded)"
    return np.arange(data.neurons.size), "all recorded neurons"


def frame_times(data: SessionData) -> dict[int, float]:
    """seq -> source time (s from session start) of the stored dF/F frames and the valid frames."""
    out: dict[int, float] = {}
    if data.dff is not None:
        out |= dict(zip(data.dff.seq.tolist(), data.seconds(data.dff.t_src_ns).tolist()))
    f = data.frames
    if f is not None:
        ok = f.valid & (f.t_src_ns > 0)
        out |= dict(zip(f.seq[ok].tolist(), data.seconds(f.t_src_ns[ok]).tolist()))
    return out


def _policy_forecast(data: SessionData, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(times, mean forecast of `cols`, label) of the policy's model at the policy's lead: the forecast made
    from frame s at lead h is placed at frame s + h: that frame's source time where it came, else source time +
    h frame intervals (the session's median interval: a replay or simulation may run faster than the rig)."""
    policy = start_record(data).get("policy") or {}
    model, lead = str(policy.get("model") or ""), int(policy.get("lead") or 0)
    known = frame_times(data)
    step = float(np.median(np.diff(sorted(known.values())))) if len(known) > 1 else data.frame_period_s
    for s in data.forecasts.values():
        if s.kind == "forecast" and model in ("", s.model) and lead in s.lead_times and len(s.seq):
            h = s.lead_times.index(lead)
            source = data.seconds(s.t_src_ns)
            times = np.array([known.get(int(q) + lead, t + lead * step) for q, t in zip(s.seq, source)])
            label = f"{s.name} at lead {lead} (placed at its target frame)"
            return times, s.data[:, h, :][:, cols].mean(axis=1), label
    return None


def _decision_points(data: SessionData, decision: str) -> list[tuple[float, float, str]]:
    """(decision time s, policy value (NaN: none), interlock) of the audit's forecast records of one decision."""
    out = []
    for r in data.records("forecast"):
        if r.get("decision") == decision:
            t = r.get("t_puback_ns") if decision == "sent" else (r.get("t_decision_ns") or r.get("t_ns"))
            v = r.get("value")
            out.append((float(data.seconds(int(t or 0))), np.nan if v is None else float(v), str(r.get("interlock"))))
    return out


def _plot_activity(ax: Any, data: SessionData) -> None:
    cols, label = monitored_columns(data)
    if data.dff is not None and len(data.dff.seq):
        ax.plot(data.seconds(data.dff.t_src_ns), data.dff.data[:, cols].mean(axis=1), color="k", lw=1,
                label=f"dF/F, {label}")
    fc = _policy_forecast(data, cols)
    if fc is not None:
        ax.plot(fc[0], fc[1], color="tab:blue", lw=1, alpha=0.8, label=fc[2])
    policy = start_record(data).get("policy") or {}
    level_ax = ax.twinx() if policy.get("kind") == "activation_threshold" else ax
    if policy.get("level") is not None:
        level_ax.axhline(float(policy["level"]), color="tab:orange", ls="--", lw=1,
                         label=f"policy level {policy['level']}")
    for i, (t, _, _) in enumerate(_decision_points(data, "sent")):
        ax.axvline(t, color="tab:red", lw=0.8, alpha=0.7, label="trigger sent (PUBACK)" if i == 0 else None)
    suppressed = _decision_points(data, "suppressed")
    for k, interlock in enumerate(sorted({p[2] for p in suppressed})):
        pts = np.array([(t, v) for t, v, il in suppressed if il == interlock])
        pts[~np.isfinite(pts[:, 1]), 1] = float(policy.get("level") or 0.0)    # no value: at the level
        level_ax.plot(pts[:, 0], pts[:, 1], ls="none", marker="xv^so"[k % 5], color="tab:purple",
                      label=f"suppressed: {interlock}")
    ax.set_ylabel("mean dF/F")
    handles, labels = ax.get_legend_handles_labels()
    if level_ax is not ax:
        more = level_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
        level_ax.set_ylabel("policy value")
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _plot_skill(ax: Any, data: SessionData) -> None:
    sk = next(iter(data.skill.values()))
    times = frame_times(data)
    t = np.array([times.get(int(q), np.nan) for q in sk.target_seq])
    for k, lead in enumerate(np.unique(sk.lead)):
        rows = np.flatnonzero(sk.lead == lead)
        color = f"C{k % 10}"
        ax.plot(t[rows], sk.rolling_mae[rows], color=color, lw=1, label=f"lead {lead}")
        ax.plot(t[rows], sk.rolling_baseline_mae[rows], color=color, lw=1, ls=":")
    ax.set_ylabel(f"rolling MAE ({sk.model})")
    ax.set_title("forecast skill per lead (dotted: mean-of-context baseline)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_session(data: SessionData, out: Path) -> Path:
    """One PNG: the monitored ensemble's dF/F and its forecast at the policy's lead, the level, triggers and
    suppressions; below it the rolling skill per lead when recorded. Returns `out`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = 2 if any(len(sk.lead) for sk in data.skill.values()) else 1
    fig = Figure(figsize=(11, 3.6 * panels + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    _plot_activity(axes[0], data)
    if panels == 2:
        _plot_skill(axes[1], data)
    axes[-1].set_xlabel("seconds from session start")
    fig.suptitle(f"{data.run_dir.name}: monitored activity, forecast and triggers")
    out = Path(out)
    fig.savefig(out, dpi=110)
    return out
