"""kbit's pytest plugin (entry point ``pytest11: kbit``): options and the conformance report.

Loaded into every pytest session of an environment where kbit is installed, so it must
cost nothing there: it imports neither torch nor kbit at load time, and its hooks do
nothing unless the session runs ``BackendConformance`` tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import pytest

_STATE = pytest.StashKey[dict]()
_PRECEDENCE = {"compared": 0, "checked": 0, "refused": 0, "skipped": 1, "xfailed": 2, "failed": 3}


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--kbit-report PATH`` and ``--kbit-goldens PATH``."""
    group = parser.getgroup("kbit", "kbit backend conformance")
    group.addoption(
        "--kbit-report",
        metavar="PATH",
        default=None,
        help="write the kbit conformance report (per backend and op) as JSON to PATH",
    )
    group.addoption(
        "--kbit-goldens",
        metavar="PATH",
        default=None,
        help="golden vectors (goldens.pt or its directory); default $KBIT_GOLDENS, then ../shared/spec/goldens",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Start with no recorded outcomes."""
    config.stash[_STATE] = {}


def _is_conformance(item: pytest.Item) -> bool:
    cls = getattr(item, "cls", None)
    return bool(cls is not None and getattr(cls, "__kbit_conformance__", False))


def _case(item: pytest.Item) -> Any:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("case") if callspec is not None else None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the placeholder pytest makes for an empty parameter set.

    A backend that declares every variant has no refusal tests, for example; that is not
    a skipped test and must not show as one.
    """
    conformance = [item for item in items if _is_conformance(item)]
    if not conformance:
        return
    from ._plan import PlannedCase

    placeholders = [
        item for item in conformance if getattr(item, "callspec", None) is not None
        and "case" in item.callspec.params and not isinstance(_case(item), PlannedCase)
    ]  # fmt: skip
    if placeholders:
        dropped = set(map(id, placeholders))
        config.hook.pytest_deselected(items=placeholders)
        items[:] = [item for item in items if id(item) not in dropped]


def _status(report: pytest.TestReport, kind: str) -> Optional[tuple[str, str]]:
    if report.failed:
        return "failed", report.longreprtext
    if report.skipped:
        if hasattr(report, "wasxfail"):
            return "xfailed", str(report.wasxfail)
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        return "skipped", reason.removeprefix("Skipped: ")
    if report.when == "call":
        from ._plan import NUMERICAL_KINDS

        if kind == "refuse":
            return "refused", ""
        return ("compared" if kind in NUMERICAL_KINDS else "checked"), ""
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """Record the outcome of each phase of a conformance test; the worst phase wins."""
    outcome = yield
    if not _is_conformance(item):
        return
    from ._report import MANIFEST_OP, Outcome

    case = _case(item)
    op, kind = (case.op, case.kind) if case is not None else (MANIFEST_OP, "manifest")
    status = _status(outcome.get_result(), kind)
    if status is None:
        return
    state = item.config.stash[_STATE]
    previous = state.get(item.nodeid)
    if previous is not None and _PRECEDENCE[previous.status] >= _PRECEDENCE[status[0]]:
        return
    state[item.nodeid] = Outcome(item.cls.backend, item.cls.device, item.name, op, kind, *status)


def _report(config: pytest.Config) -> Any:
    from ._report import ConformanceReport

    report = ConformanceReport()
    for outcome in config.stash.get(_STATE, {}).values():
        report.add(outcome)
    return report


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Print the per-op conformance table after the run."""
    if not config.stash.get(_STATE, {}):
        return
    terminalreporter.section("kbit conformance")
    terminalreporter.write_line(_report(config).render())


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Write the JSON report when ``--kbit-report`` asks for it (an empty one if nothing ran)."""
    path = session.config.getoption("kbit_report", default=None)
    if not path:
        return
    import torch

    from .._version import __version__

    payload = _report(session.config).to_json(kbit=__version__, torch=torch.__version__)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2))
