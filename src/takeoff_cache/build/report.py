"""The build report every run produces, whatever its end."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from takeoff_cache.build.readiness import readiness_lines


@dataclass
class BuildReport:
    outcome: str = "failure"  # success | failure | idempotent_no_op
    engines_built: int = 0
    engines_reused: int = 0
    descriptors_generated: int = 0
    descriptors_reused: int = 0
    tiles: int = 0
    build_identity: str | None = None
    manifest_path: str | None = None
    failure_reason: str | None = None
    elapsed_s: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # int8 builds: mean cosine similarity of int8 vs fp32 descriptors, per backbone.
    precision_drift: dict[str, float] = field(default_factory=dict)
    # The self-test's figures (k, recall_at_1, recall_at_5, median_error_m, seconds);
    # None when it did not run. The coverage map it drew, in the work folder.
    self_test: dict[str, Any] | None = None
    coverage_map: str | None = None
    # The features phase: extractor, tiles extracted and reused, the file's bytes per tile.
    local_features: dict[str, Any] | None = None
    # The readiness verdict (build/readiness.py): coverage of the area and the route,
    # the self-test judged; None when the build stopped before it.
    ready: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        # The name of build_identity until 0.1; kept one release for scripts that read it.
        out["manifest_hash"] = self.build_identity
        return out

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> BuildReport:
        """The report from its JSON; keys a newer build added (and manifest_hash) are dropped."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})

    def markdown(self) -> str:
        lines = ["# takeoff-cache build report", ""]
        if self.ready:
            lines += ["```", *readiness_lines(self.ready), "```", ""]
        shown = ("phases", "self_test", "ready", "warnings", "precision_drift", "local_features")
        rows = [
            f"| {k} | {_plain(v)} |"
            for k, v in asdict(self).items()
            if k not in shown and v is not None
        ]
        phases = " · ".join(f"{k} {v:.2f}s" for k, v in self.phases.items())
        lines += ["| field | value |", "|---|---|", *rows, "", f"**phases:** {phases}", ""]
        if self.local_features:
            lines += [f"**local features:** {self.local_features_line()}", ""]
        if self.self_test:
            lines += [f"**self-test:** {self.self_test_line()}", ""]
        if registered := self.registered_line():
            lines += [f"**registered:** {registered}", ""]
        lines += [f"**int8 drift:** {line}" for line in self._drift_lines()]
        lines += [f"**warning:** {w}" for w in self.warnings]
        return "\n".join(lines) + ("\n" if self.warnings or self.precision_drift else "")

    def self_test_line(self) -> str:
        st = self.self_test or {}
        return (
            f"Recall@1 {st.get('recall_at_1', 0):.3f}, Recall@5 {st.get('recall_at_5', 0):.3f},"
            f" median error {st.get('median_error_m', 0):.0f} m"
            f" ({st.get('k', 0)} views, {st.get('seconds', 0):.2f}s)"
        )

    def registered_line(self) -> str | None:
        """The self-test's registered figures (localize/registered.py), if it has them."""
        reg = (self.self_test or {}).get("registered")
        if not isinstance(reg, dict):
            return None
        sigma = reg.get("median_sigma_m")
        return (
            f"Recall@1 {reg.get('recall_at_1') or 0:.3f} after re-ranking,"
            f" median error {reg.get('median_error_m') or 0:.1f} m,"
            f" p90 {reg.get('p90_error_m') or 0:.1f} m,"
            f" {100 * (reg.get('registered_share') or 0):.0f}% of {reg.get('k', 0)} views"
            f" registered"
            + (f", median 1-sigma {sigma:.1f} m" if isinstance(sigma, int | float) else "")
            + f" ({reg.get('views_reused', 0)} kept, {reg.get('seconds') or 0:.2f}s)"
        )

    def local_features_line(self) -> str:
        lf = self.local_features or {}
        matched = f"; matched by {lf['matcher']!r}" if lf.get("matcher") else ""
        return (
            f"{lf.get('extractor')}: {lf.get('generated', 0)} tiles extracted,"
            f" {lf.get('reused', 0)} reused; {lf.get('bytes_per_tile', 0)} bytes a tile"
            f" (at most {lf.get('max_keypoints', 0)} keypoints){matched}"
        )

    def _drift_lines(self) -> list[str]:
        return [
            f"{name}: mean cosine {value:.4f} vs fp32"
            for name, value in self.precision_drift.items()
        ]

    def text(self) -> str:
        """The report for a person: the verdict first, then what the build did."""
        lines = readiness_lines(self.ready) if self.ready else []
        lines.append(f"outcome:               {self.outcome}")
        if self.failure_reason and self.ready and not self.ready.get("ok"):
            lines.append("failure_reason:        not ready (the reasons above)")
        elif self.failure_reason:
            lines.append(f"failure_reason:        {self.failure_reason}")
        lines += [
            f"tiles:                 {self.tiles}",
            f"engines_built:         {self.engines_built}",
            f"engines_reused:        {self.engines_reused}",
            f"descriptors_generated: {self.descriptors_generated}",
            f"descriptors_reused:    {self.descriptors_reused}",
        ]
        if self.build_identity:
            lines.append(f"build_identity:        {self.build_identity}")
        if self.manifest_path:
            lines.append(f"manifest_path:         {self.manifest_path}")
        lines += [
            f"elapsed_s:             {self.elapsed_s:.2f}",
            "phases:                " + ", ".join(f"{k} {v:.2f}s" for k, v in self.phases.items()),
        ]
        lines += [f"int8 drift:            {line}" for line in self._drift_lines()]
        if self.local_features:
            lines.append(f"local_features:        {self.local_features_line()}")
        if self.self_test:
            lines.append(f"self_test:             {self.self_test_line()}")
        if registered := self.registered_line():
            lines.append(f"registered:            {registered}")
        if self.coverage_map:
            lines.append(f"coverage_map:          {self.coverage_map}")
        lines += [f"warning:               {w}" for w in self.warnings]
        return "\n".join(lines)


def _plain(value: Any) -> str:
    """A value for a person: lists as comma-separated items, never a Python repr."""
    if isinstance(value, list | tuple):
        return ", ".join(_plain(v) for v in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_plain(v)}" for k, v in value.items()) or "-"
    return str(value)
