"""The build report every run produces, whatever its end."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


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
        rows = [
            f"| {k} | {v} |" for k, v in asdict(self).items() if k not in ("phases", "self_test")
        ]
        phases = " · ".join(f"{k} {v:.2f}s" for k, v in self.phases.items())
        lines = [
            "# takeoff-cache build report",
            "",
            "| field | value |",
            "|---|---|",
            *rows,
            "",
            f"**phases:** {phases}",
            "",
        ]
        if self.self_test:
            lines += [f"**self-test:** {self.self_test_line()}", ""]
        return "\n".join(lines)

    def self_test_line(self) -> str:
        st = self.self_test or {}
        return (
            f"Recall@1 {st.get('recall_at_1', 0):.3f}, Recall@5 {st.get('recall_at_5', 0):.3f},"
            f" median error {st.get('median_error_m', 0):.0f} m"
            f" ({st.get('k', 0)} views, {st.get('seconds', 0):.2f}s)"
        )

    def text(self) -> str:
        lines = [f"outcome:               {self.outcome}"]
        if self.failure_reason:
            lines.append(f"failure_reason:        {self.failure_reason}")
        lines += [
            f"tiles:                 {self.tiles}",
            f"engines_built:         {self.engines_built}",
            f"engines_reused:        {self.engines_reused}",
            f"descriptors_generated: {self.descriptors_generated}",
            f"descriptors_reused:    {self.descriptors_reused}",
            f"build_identity:        {self.build_identity}",
            f"manifest_path:         {self.manifest_path}",
            f"elapsed_s:             {self.elapsed_s:.2f}",
            "phases:                " + ", ".join(f"{k} {v:.2f}s" for k, v in self.phases.items()),
        ]
        lines += [
            f"int8 drift:            {name}: mean cosine {value:.4f} vs fp32"
            for name, value in self.precision_drift.items()
        ]
        if self.self_test:
            lines.append(f"self_test:             {self.self_test_line()}")
        if self.coverage_map:
            lines.append(f"coverage_map:          {self.coverage_map}")
        lines += [f"warning:               {w}" for w in self.warnings]
        return "\n".join(lines)
