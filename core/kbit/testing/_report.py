"""The conformance report: per backend and op, what was compared, checked, refused, failed or skipped.

Built by the pytest plugin from test outcomes, printed at the end of the run and written
as JSON with ``--kbit-report PATH``; ``kbit conformance`` reads the JSON for its exit code.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterable

__all__ = ["STATUSES", "PASSING", "Outcome", "ConformanceReport", "blocking"]

#: Columns of the report. A passing test is ``compared`` when it compared the backend's numbers
#: (with the reference backend, the golden vectors or a statistical bar) and ``checked`` when
#: it checked machinery (the manifest, ``torch.library.opcheck``); ``refused`` counts
#: undeclared variants correctly refused; ``xfailed`` counts the author's
#: ``expected_failures`` that did fail. So "327 compared" says how many tests compared results.
STATUSES = ("compared", "checked", "refused", "failed", "skipped", "xfailed")

#: Statuses of a test that passed.
PASSING = ("compared", "checked", "refused")

#: Kinds whose skip does not block a verdict: goldens are an extra check that needs files.
_OPTIONAL_KINDS = ("goldens",)

#: The op column of tests about the manifest rather than an op.
MANIFEST_OP = "(manifest)"


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The final status of one conformance test."""

    backend: str
    device: str
    test: str
    op: str
    kind: str
    status: str
    message: str = ""

    def as_dict(self) -> dict[str, str]:
        """JSON form."""
        return dataclasses.asdict(self)


def blocking(outcome: Outcome | dict[str, Any]) -> bool:
    """Whether this outcome means the backend is not (known to be) conformant.

    A failure always blocks; so does a skip, since a declared variant that was not run has
    not passed. The only exception is a skipped golden check (no golden files here).
    """
    get = outcome.get if isinstance(outcome, dict) else lambda key: getattr(outcome, key)
    return get("status") == "failed" or (get("status") == "skipped" and get("kind") not in _OPTIONAL_KINDS)


class ConformanceReport:
    """Outcomes of the conformance tests of one pytest session, grouped by backend and device."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []

    def add(self, outcome: Outcome) -> None:
        """Record one test's final outcome."""
        self.outcomes.append(outcome)

    def runs(self) -> dict[tuple[str, str], list[Outcome]]:
        """Outcomes by ``(backend, device)``, in first-seen order."""
        grouped: dict[tuple[str, str], list[Outcome]] = {}
        for outcome in self.outcomes:
            grouped.setdefault((outcome.backend, outcome.device), []).append(outcome)
        return grouped

    @staticmethod
    def _counts(outcomes: Iterable[Outcome]) -> dict[str, dict[str, int]]:
        table: dict[str, collections.Counter] = {}
        for outcome in outcomes:
            table.setdefault(outcome.op, collections.Counter())[outcome.status] += 1
        return {op: {status: counter[status] for status in STATUSES} for op, counter in table.items()}

    def to_json(self, **header: Any) -> dict[str, Any]:
        """The report as JSON-ready data; ``header`` adds top-level fields (versions)."""
        runs = []
        for (backend, device), outcomes in self.runs().items():
            ops = self._counts(outcomes)
            totals = {status: sum(counts[status] for counts in ops.values()) for status in STATUSES}
            runs.append(
                {
                    "backend": backend,
                    "device": device,
                    "conformant": not any(blocking(o) for o in outcomes),
                    "totals": totals,
                    "ops": ops,
                    "problems": [o.as_dict() for o in outcomes if o.status in ("failed", "skipped", "xfailed")],
                }
            )
        return {**header, "runs": runs}

    def render(self, max_problems: int = 20) -> str:
        """A plain-text summary: one table per backend, then the failing tests."""
        from ..cli._table import render_table

        blocks = []
        for (backend, device), outcomes in self.runs().items():
            ops = self._counts(outcomes)
            rows = [(op, *(str(counts[s]) for s in STATUSES)) for op, counts in ops.items()]
            totals = [sum(counts[s] for counts in ops.values()) for s in STATUSES]
            rows.append(("total", *(str(t) for t in totals)))
            verdict = "CONFORMANT" if not any(blocking(o) for o in outcomes) else "NOT CONFORMANT"
            lines = [f"kbit conformance: backend {backend!r} on {device}: {verdict}"]
            lines.append(render_table(("OP", *(s.upper() for s in STATUSES)), rows))
            # Identical messages (an unavailable backend skips everything) are shown once.
            grouped: dict[tuple[str, str], list[str]] = {}
            for outcome in outcomes:
                if blocking(outcome):
                    text = outcome.message.strip()
                    grouped.setdefault((outcome.status, text.splitlines()[0][:200] if text else ""), []).append(
                        outcome.test
                    )
            for (status, message), tests in list(grouped.items())[:max_problems]:
                more = f" (and {len(tests) - 1} more tests)" if len(tests) > 1 else ""
                lines.append(f"  {status.upper()} {tests[0]}{more}: {message}")
            if len(grouped) > max_problems:
                lines.append(f"  ... and {len(grouped) - max_problems} more problems (see --kbit-report)")
            blocks.append("\n".join(lines))
        return "\n\n".join(blocks)
