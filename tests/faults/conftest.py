"""Fixtures of the fault suite and its summary table.

Every test records its figures through the ``fault_report`` fixture; at the end
of the run :func:`pytest_terminal_summary` prints one row per test (faults
injected, sessions completed, tokens lost, outputs identical, ...) and, when
``MW_FAULTS_REPORT`` names a path, writes the rows there as JSON.

``MW_FAULTS_FULL=1`` turns on the long variants (soak with 256 devices for 10
minutes, 100,000 fuzzed payloads); without it they are skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.faults.audit import Audit

FULL = os.environ.get("MW_FAULTS_FULL", "") not in ("", "0")
full_only = pytest.mark.skipif(not FULL, reason="long variant: run with MW_FAULTS_FULL=1")

_ROWS = pytest.StashKey[list[dict[str, Any]]]()


@dataclass
class FaultFigures:
    """One test's row of the summary table."""

    test: str
    faults_injected: int
    sessions: int
    sessions_completed: int
    tokens: int
    tokens_lost: int
    tokens_duplicated: int
    outputs_identical: bool
    notes: dict[str, Any] = field(default_factory=dict)


class FaultReport:
    """Collects one test's figures; :meth:`record` also asserts that no token was lost."""

    def __init__(self, test: str) -> None:
        self.test = test
        self.rows: list[FaultFigures] = []

    def record(self, *, faults: int, audits: Iterable[Audit], **notes: Any) -> FaultFigures:
        audits = list(audits)
        row = FaultFigures(
            test=self.test,
            faults_injected=faults,
            sessions=len(audits),
            sessions_completed=sum(a.completed for a in audits),
            tokens=sum(a.committed_len for a in audits),
            tokens_lost=sum(a.lost for a in audits),
            tokens_duplicated=sum(a.duplicated for a in audits),
            outputs_identical=bool(audits) and all(a.identical for a in audits),
            notes=notes,
        )
        self.rows.append(row)
        bad = [a for a in audits if a.lost or a.duplicated or not a.identical]
        assert row.tokens_lost == 0, f"tokens lost: {bad}"
        assert row.tokens_duplicated == 0, f"tokens duplicated: {bad}"
        assert row.outputs_identical, f"outputs differ from the reference: {bad}"
        return row


@pytest.fixture
def fault_report(request: pytest.FixtureRequest) -> Iterator[FaultReport]:
    report = FaultReport(request.node.nodeid.split("::", 1)[-1])
    yield report
    request.config.stash.setdefault(_ROWS, []).extend(asdict(r) for r in report.rows)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a small shared machine the tiny model is several times faster."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
async def _wide_executor() -> AsyncIterator[None]:
    """Many simulated devices draft in worker threads at once; the default pool has cpu+4."""
    import asyncio

    pool = ThreadPoolExecutor(max_workers=300, thread_name_prefix="faults")
    asyncio.get_running_loop().set_default_executor(pool)
    yield
    pool.shutdown(wait=False, cancel_futures=True)


@pytest.fixture(scope="session")
def tiny_target() -> Any:
    """The tiny random target (the verifier processes build the same one: seed 0)."""
    from tests.unit.tiny import tiny_llama

    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def tiny_draft() -> Any:
    """A noisy copy of the tiny target: a real model drafter that is often, not always, right."""
    from tests.unit.tiny import noisy_copy

    return noisy_copy(seed=0)


@pytest.fixture(scope="session")
def reference(tiny_target: Any) -> Callable[[tuple[int, ...], int], list[int]]:
    """``reference(prompt, max_new)``: target-only greedy decoding of the tiny target (cached)."""
    from middleware.verifier.reference import reference_greedy
    from tests.unit.tiny import EOS

    @cache
    def ref(prompt: tuple[int, ...], max_new: int) -> tuple[int, ...]:
        return tuple(reference_greedy(tiny_target, prompt, max_new, (EOS,)))

    return lambda prompt, max_new: list(ref(tuple(prompt), max_new))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    rows = config.stash.get(_ROWS, [])
    if not rows:
        return
    tr = terminalreporter
    tr.write_sep("=", "fault-injection summary")
    head = ("test", "faults", "sessions done", "tokens", "lost", "dup", "identical")
    body = [
        (
            r["test"],
            str(r["faults_injected"]),
            f"{r['sessions_completed']}/{r['sessions']}",
            str(r["tokens"]),
            str(r["tokens_lost"]),
            str(r["tokens_duplicated"]),
            "yes" if r["outputs_identical"] else "NO",
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    for line in (head, tuple("-" * w for w in widths), *body):
        tr.write_line("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)))
    for r in rows:
        if r["notes"]:
            tr.write_line(f"{r['test']}: " + ", ".join(f"{k}={v}" for k, v in r["notes"].items()))
    total_lost = sum(r["tokens_lost"] for r in rows)
    tr.write_line(
        f"total: {len(rows)} runs, {sum(r['faults_injected'] for r in rows)} faults, "
        f"{sum(r['sessions_completed'] for r in rows)}/{sum(r['sessions'] for r in rows)} "
        f"sessions completed, {total_lost} tokens lost"
    )
    path = os.environ.get("MW_FAULTS_REPORT")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(
            json.dumps({"full": FULL, "rows": rows}, indent=2, default=str) + "\n"
        )
        tr.write_line(f"fault report written to {path}")
