"""The prepare report every run produces, whatever its end: filled phase by phase."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from takeoff_cache.build.readiness import readiness_lines
from takeoff_cache.build.report import BuildReport
from takeoff_cache.errors import EXIT_NOT_READY

if TYPE_CHECKING:
    from takeoff_cache.prepare.job import Job


@dataclass
class PrepareReport:
    outcome: str | None = None  # success | idempotent_no_op | failure | dry_run
    # The readiness verdict (build/readiness.py), the build's: first in every report.
    ready: dict[str, Any] | None = None
    phase: str = "resolve"  # the phase under way, or the one that stopped; done at the end
    phases: dict[str, float] = field(default_factory=dict)  # seconds, as the flow timed them
    flight: dict[str, Any] | None = None
    area: dict[str, Any] | None = None  # MissionArea's JSON, and its file's path once written
    corpus: str | None = None
    lock: str | None = None  # the workstation lock's path
    download: dict[str, Any] | None = None  # what was fetched, is missing, or would be fetched
    companion: dict[str, Any] | None = None  # {bring_up, transfer}
    # The build's report as it came (here, from a worker or a companion): a JSON
    # object, not a BuildReport, so the fields of a newer build are kept.
    build: dict[str, Any] | None = None
    verify: dict[str, Any] | None = None
    exit_code: int | None = None
    error: str | None = None

    def resolved(self, job: Job) -> None:
        """The resolve phase's part: the flight, its area and the corpus."""
        from takeoff_cache.prepare.job import flight_summary  # the area's code: once resolved

        self.flight = flight_summary(job.flight)
        self.area = job.mission.to_json()
        self.corpus = str(job.corpus)

    def fail(self, exit_code: int, error: str) -> None:
        self.outcome, self.exit_code, self.error = "failure", exit_code, error

    def finish(self, outcome: str) -> None:
        self.outcome, self.phase, self.exit_code = outcome, "done", 0

    def to_json(self) -> dict[str, Any]:
        # What a phase did not reach is left out rather than null, and so are the
        # phases of an answer the command line gave before the flow timed any.
        out = asdict(self)
        if not self.phases:
            del out["phases"]
        return {k: v for k, v in out.items() if v is not None or k == "outcome"}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> PrepareReport:
        """The report from its JSON; keys a newer worker or companion added are dropped."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})

    def subject(self) -> str:
        """What the report is about: its flight's id, else where the flight came from."""
        flight = self.flight or {}
        return str(flight.get("id") or flight.get("source") or "flight")

    def text(self) -> str:
        """The report for a person: flight, area, corpus, download, build, verify."""
        lines: list[str] = []
        if self.flight is not None:
            area, download = self.area or {}, self.download or {}
            lines += [
                f"flight:   {self.subject()}",
                f"area:     {area['km2']:.2f} km², {area['tiles']} tiles"
                f" ({per_zoom(area['tiles_per_zoom'])})",
                *(f"warning:  {w}" for w in area.get("warnings", [])),
                f"corpus:   {self.corpus}",
            ]
            if download.get("dry_run"):
                lines.append(
                    f"dry run:  {download['to_fetch']} tiles to fetch"
                    f" ({per_zoom(download['per_zoom'])}),"
                    f" about {download['estimated_bytes']:,} bytes; nothing fetched"
                )
            elif download.get("source"):
                lines.append(
                    f"download: {download['fetched']} fetched, {download['kept']} kept,"
                    f" {download['revalidated']} revalidated, {download['failed_count']} failed,"
                    f" {download['bytes']:,} bytes, {download['tiles_per_s']} tiles/s"
                )
                if download.get("failed"):
                    more = download["failed_count"] - len(download["failed"])
                    lines.append(
                        f"failed:   {'; '.join(download['failed'])}"
                        + (f"; and {more} more" if more > 0 else "")
                    )
            elif "missing" in download:
                lines.append(
                    f"missing:  {download['missing']} tiles of the area are not in the corpus"
                )
        if self.companion is not None:
            up, sent = self.companion["bring_up"], self.companion["transfer"]
            lines += [
                f"companion: {up['target']}: takeoff-cache {up['version']}, {up['backend']}"
                f" {up['backend_version']} ({up['host_tag']})",
                f"transfer: {sent['bytes_sent']:,} bytes sent in {sent['files_sent']} files,"
                f" {sent['bytes_skipped']:,} already there, {sent['elapsed_s']:.2f} s",
            ]
        if self.build is not None:
            # Its verdict is this report's, shown first.
            build = {**self.build, "ready": None}
            if self.exit_code == EXIT_NOT_READY:
                build["failure_reason"] = "not ready (the reasons above)"
            lines.append(BuildReport.from_json(build).text())
        if self.verify is not None:
            lines.append(
                f"verify:   ok (manifest version {self.verify['version']})"
                if self.verify.get("ok")
                else f"verify:   skipped: {self.verify.get('skipped')}"
            )
        if self.exit_code == EXIT_NOT_READY:
            lines.append(
                f"stopped:  {self.phase}: not ready (the reasons above);"
                " the previous cache stays in force"
            )
        elif self.error:
            lines.append(f"stopped:  {self.phase}: {self.error}")
        ready = readiness_lines(self.ready) if self.ready else []
        return "\n".join([*ready, *lines])

    def markdown(self) -> str:
        """The report as the Prefect UI shows it (an artifact of the run)."""
        return f"# Prepare: {self.subject()} — {self.outcome}\n\n```\n{self.text()}\n```\n"


def per_zoom(counts: dict[str, int] | None) -> str:
    """``{"16": 46, "17": 180}`` as a person reads it: ``z16 46, z17 180``."""
    return ", ".join(f"z{z} {n}" for z, n in (counts or {}).items()) or "none"
