"""``BackendConformance``: the test class a backend author subclasses.

The class generates its tests from the backend's manifest when pytest collects it (its
``pytest_generate_tests``), so it needs no conftest and works with or without the kbit
pytest plugin; the plugin adds the report and the ``--kbit-report`` / ``--kbit-goldens``
options.
"""

from __future__ import annotations

import warnings
from typing import ClassVar, Mapping, Optional

import pytest

from .. import backends
from .._errors import BackendUnavailableError, KbitPluginWarning
from .._manifest import BackendManifest
from .._opnames import family_of
from .._version import __version__
from ..backend import Backend
from ..backends._registry import REFERENCE, REGISTRY, UNAVAILABLE
from ._cases import golden_checks, op_cases
from ._goldens import find_goldens, load_goldens, missing_goldens
from ._plan import KINDS, PlannedCase, effective_tolerance, manifest_problems, plan
from ._runner import (
    compare_with_reference,
    golden_problems,
    opcheck_case,
    refusal_problem,
    routing_problem,
    statistics_problems,
)
from .tolerances import Tolerance

__all__ = ["BackendConformance"]

_KIND_OF_TEST = {test: kind for kind, test in KINDS.items()}


class BackendConformance:
    """Subclass this (as ``Test<Something>``) to run kbit's conformance suite on a backend.

    Set ``backend`` to the registry name and ``device`` to the device type to test on.
    From the backend's manifest the class generates, for every op with conformance cases:

    - ``test_matches_reference[<op>-<variant>]``: every declared (op, dtype, blocksize,
      quant type, storage, ...) on seeded inputs, edge sizes included, against the
      reference backend: bit-exact where the format demands it, the shared tolerance
      table (``kbit.testing.tolerances.CONFORMANCE``) elsewhere;
    - ``test_refuses_undeclared[<op>-<variant>]``: every variant the API accepts but the
      manifest does not declare raises ``UnsupportedOpError`` with the backend pinned;
    - ``test_opcheck[<op>-<variant>]``: ``torch.library.opcheck`` routed to the backend;
    - ``test_goldens[<op>]``: the golden vectors, where they are available;
    - ``test_statistics[<op>-<variant>]``: properties over many draws, such as unbiased
      stochastic rounding (for ops that have such a check);
    - ``test_has_cases[<op>]``: skipped, for a declared op this kbit has no cases for;

    plus ``test_manifest``, which checks the manifest and these settings.

    Optional settings:

    - ``expected_failures``: ``{test name: reason}``, e.g.
      ``{"test_matches_reference[dequantize_blockwise-float16-64]": "acme#12"}``. Each
      becomes a strict xfail: it must fail, and the suite tells you when it is fixed.
    - ``extra_tolerances``: ``{op: Tolerance}``, loosening the shared table for an op that
      is not bit-exact by the format (asking it for a bit-exact op is an error).
    - ``manifest``: a ``BackendManifest`` to register before each test, for a backend
      that is not installed (yet); installed backends are found by name.

    Fixtures: ``kbit_backend`` (the backend under test; skips when it is unavailable
    here), ``kbit_reference`` (the oracle) and ``kbit_goldens`` (the golden vectors).
    """

    backend: ClassVar[str] = ""
    device: ClassVar[str] = "cpu"
    expected_failures: ClassVar[Mapping[str, str]] = {}
    extra_tolerances: ClassVar[Mapping[str, Tolerance]] = {}
    manifest: ClassVar[Optional[BackendManifest]] = None

    #: Lets the kbit pytest plugin recognise these tests without importing kbit.
    __kbit_conformance__: ClassVar[bool] = True

    # ------------------------------------------------------------------ collection
    @classmethod
    def _manifest_under_test(cls) -> Optional[BackendManifest]:
        if cls.manifest is not None:
            return cls.manifest
        with warnings.catch_warnings():
            # A broken plugin is reported by test_manifest; no need to warn at collection.
            warnings.simplefilter("ignore", KbitPluginWarning)
            record = REGISTRY.records().get(cls.backend)
        return record.manifest if record is not None else None

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Parametrize each generated test with the cases the backend's manifest calls for."""
        kind = _KIND_OF_TEST.get(metafunc.function.__name__)
        if kind is None:
            return
        manifest = self._manifest_under_test()
        cases = [case for case in plan(manifest) if case.kind == kind] if manifest is not None else []
        params = []
        for case in cases:
            reason = self.expected_failures.get(case.test_name)
            marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason is not None else []
            params.append(pytest.param(case, id=case.id, marks=marks))
        metafunc.parametrize("case", params)

    # -------------------------------------------------------------------- fixtures
    @pytest.fixture(autouse=True)
    def _kbit_registered(self) -> None:
        # Re-registered before every test: a test session may reset the registry.
        if self.manifest is not None:
            record = REGISTRY.records().get(self.manifest.name)
            if record is None or record.manifest is not self.manifest:
                backends.register(self.manifest, replace=True)

    @pytest.fixture
    def kbit_backend(self) -> Backend:
        """The backend under test; the test is skipped when it is unavailable here."""
        try:
            return backends.get(self.backend)
        except BackendUnavailableError:
            record = REGISTRY.records().get(self.backend)
            if record is not None and record.state == UNAVAILABLE:
                pytest.skip(f"backend {self.backend!r} is unavailable here: {record.reason}")
            raise

    @pytest.fixture
    def kbit_reference(self) -> Backend:
        """The reference backend, the oracle of every comparison."""
        return backends.get(REFERENCE)

    @pytest.fixture
    def kbit_goldens(self, request: pytest.FixtureRequest) -> dict:
        """The golden vectors; the test is skipped (with where it looked) when they are absent,
        or fails when ``KBIT_REQUIRE_GOLDENS=1``."""
        option = request.config.getoption("kbit_goldens", default=None)
        path, why_not = find_goldens(option, request.config.rootpath)
        if path is None:
            missing_goldens(why_not)
        return load_goldens(path)

    # ----------------------------------------------------------------------- tests
    def test_manifest(self) -> None:
        """The manifest loads, serves ``device`` and declares only what the API can request."""
        if not self.backend:
            pytest.fail(f"{type(self).__name__} must set `backend` to a registry name", pytrace=False)
        problems = []
        if self.manifest is not None and self.manifest.name != self.backend:
            problems.append(f"manifest is named {self.manifest.name!r} but backend = {self.backend!r}")
        record = REGISTRY.records().get(self.backend)
        if record is None:
            problems.append(f"no backend named {self.backend!r} is installed (known: {sorted(REGISTRY.records())})")
        elif record.manifest is None:
            problems.append(f"backend {self.backend!r} is {record.state}: {record.reason}")
        else:
            problems += manifest_problems(record.manifest, self.device, self.expected_failures, self.extra_tolerances)
        if problems:
            pytest.fail("\n".join(problems), pytrace=False)

    def test_matches_reference(self, case: PlannedCase, kbit_backend: Backend, kbit_reference: Backend) -> None:
        """A declared variant gives the reference backend's results on every input set."""
        problem = routing_problem(case.op, case.variant, self.backend, self.device)
        if problem:
            pytest.fail(problem, pytrace=False)
        tolerance = effective_tolerance(case.op, self.extra_tolerances)
        problems = compare_with_reference(op_cases()[case.op], case.variant, self.backend, self.device, tolerance)
        if problems:
            pytest.fail(f"{case.variant.id} on {self.device}:\n" + "\n".join(problems), pytrace=False)

    def test_refuses_undeclared(self, case: PlannedCase, kbit_backend: Backend) -> None:
        """An undeclared variant raises ``UnsupportedOpError`` with the backend pinned."""
        problem = refusal_problem(op_cases()[case.op], case.variant, self.backend, self.device)
        if problem:
            pytest.fail(problem, pytrace=False)

    def test_opcheck(self, case: PlannedCase, kbit_backend: Backend) -> None:
        """``torch.library.opcheck`` passes with the op routed to the backend."""
        try:
            opcheck_case(op_cases()[case.op], case.variant, self.backend, self.device)
        except Exception as exc:  # OpCheckError and anything the backend raises
            cause = f" (caused by {type(exc.__cause__).__name__})" if exc.__cause__ is not None else ""
            pytest.fail(f"opcheck of {case.variant.id}: {type(exc).__name__}{cause}: {exc}", pytrace=False)

    def test_goldens(self, case: PlannedCase, kbit_backend: Backend, kbit_goldens: dict) -> None:
        """The backend reproduces the golden vectors for every entry it declares."""
        record = REGISTRY.records()[self.backend]
        checked, problems = golden_problems(
            golden_checks()[case.op], kbit_goldens, record.manifest, self.backend, self.device
        )
        if problems:
            pytest.fail("\n".join(problems), pytrace=False)
        if not checked:
            pytest.skip(f"no golden entry of {case.op} matches what {self.backend!r} declares")

    def test_statistics(self, case: PlannedCase, kbit_backend: Backend) -> None:
        """The backend's own results have the op's statistical properties (no reference needed)."""
        problems = statistics_problems(op_cases()[case.op], case.variant, self.backend, self.device)
        if problems:
            pytest.fail(f"{case.variant.id} on {self.device}:\n" + "\n".join(problems), pytrace=False)

    def test_has_cases(self, case: PlannedCase) -> None:
        """Placeholder for a declared op this kbit has no conformance cases for: skipped."""
        pytest.skip(
            f"{case.op} is declared, but kbit {__version__} has no conformance cases for it "
            f"(family {family_of(case.op)}): it is untested"
        )
