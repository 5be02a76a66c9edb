"""The workbench's worker-thread plumbing: task results come back in the GUI thread, stale
work is superseded, and garbage is collected in the GUI thread only."""

from __future__ import annotations

import gc
import threading

from workbench.jobs import Job
from workbench.worker import GuiThreadGarbageCollection, TaskRunner


def test_superseded_tasks_never_run_or_report(qtbot):
    runner = TaskRunner()
    gate = threading.Event()
    ran, reported = [], []
    runner.submit(lambda: (gate.wait(5), "blocker")[1], reported.append, name="blocker")  # holds the one thread
    for angle in (10, 20, 30):
        runner.submit(lambda a=angle: ran.append(a) or a, reported.append, name="equivariance", supersede=True)
    runner.submit(lambda: "other", reported.append, name="metrics")  # other names are not touched
    assert runner.pending == 5
    gate.set()
    qtbot.waitUntil(lambda: runner.pending == 0, timeout=5000)
    assert ran == [30]  # the queued 10 and 20 were skipped, not computed
    assert sorted(map(str, reported)) == ["30", "blocker", "other"]


def test_a_running_task_that_is_superseded_is_dropped(qtbot):
    runner = TaskRunner()
    started, gate = threading.Event(), threading.Event()
    reported, errors = [], []

    def slow():
        started.set()
        gate.wait(5)
        return "old slice"

    runner.submit(slow, reported.append, errors.append, name="reconstruct", supersede=True)
    started.wait(5)
    runner.submit(lambda: "new slice", reported.append, errors.append, name="reconstruct", supersede=True)
    gate.set()
    qtbot.waitUntil(lambda: runner.pending == 0, timeout=5000)
    assert reported == ["new slice"] and errors == []


def test_without_supersede_every_task_reports(qtbot):
    runner = TaskRunner()
    reported = []
    for i in range(3):
        runner.submit(lambda i=i: i, reported.append, name="save checkpoint")
    qtbot.waitUntil(lambda: runner.pending == 0, timeout=5000)
    assert reported == [0, 1, 2]


def test_a_cancelled_job_never_runs_or_is_dropped_and_says_so(qtbot):
    runner = TaskRunner()
    started, gate = threading.Event(), threading.Event()
    reported, cancelled, ran = [], [], []
    running, queued = Job("Reconstructing"), Job("Probing")

    def slow():
        started.set()
        gate.wait(5)
        return "finished anyway"

    runner.submit(slow, reported.append, name="reconstruct", job=running, on_cancel=lambda: cancelled.append("r"))
    runner.submit(lambda: ran.append("probe"), reported.append, name="probe", job=queued,
                  on_cancel=lambda: cancelled.append("p"))
    started.wait(5)
    assert runner.active_jobs() == [running, queued]
    runner.cancel_all()
    gate.set()
    qtbot.waitUntil(lambda: runner.pending == 0, timeout=5000)
    assert reported == [] and ran == [] and cancelled == ["r", "p"] and runner.active_jobs() == []


def test_superseding_a_running_task_cancels_its_job(qtbot):
    runner = TaskRunner()
    started = threading.Event()
    old = Job("Reconstructing slice 3")

    def slow():
        started.set()
        for _ in range(500):  # a solve checking its stop flag between iterations
            old.check()
            threading.Event().wait(0.01)
        return "slice 3"

    reported = []
    runner.submit(slow, reported.append, name="reconstruct", supersede=True, job=old)
    started.wait(5)
    runner.submit(lambda: "slice 4", reported.append, name="reconstruct", supersede=True, job=Job("slice 4"))
    assert old.cancelled
    qtbot.waitUntil(lambda: runner.pending == 0, timeout=3000)  # long before the 5 s the old one would take
    assert reported == ["slice 4"]


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_garbage_is_collected_in_the_gui_thread_only_while_active(qtbot):
    collected_in: list[int] = []

    def record(phase, _info):
        if phase == "start":
            collected_in.append(threading.get_ident())

    first, second = GuiThreadGarbageCollection(), GuiThreadGarbageCollection()
    was_enabled = gc.isenabled()
    gc.enable()
    gc.callbacks.append(record)
    try:
        first.start()
        second.start()  # two windows
        assert not gc.isenabled()
        worker = threading.Thread(target=lambda: [_Cycle() for _ in range(50_000)])  # far over the threshold
        worker.start()
        worker.join()
        assert worker.ident not in collected_in
        first.collect()
        assert collected_in and set(collected_in) == {threading.get_ident()}
        first.stop()
        assert not gc.isenabled()  # the second window is still open
        second.stop()
        assert gc.isenabled()
    finally:
        gc.callbacks.remove(record)
        for guard in (first, second):
            guard.stop()
        (gc.enable if was_enabled else gc.disable)()
