"""The status bar's view of long work: the task runner's current job with its progress
(a bar, or a busy indicator when the amount of work is unknown), the seconds it has
run, and a Cancel button. It polls the runner on a timer, so the task threads never
touch a widget; a job shows only after :data:`SHOW_AFTER_S`, so quick ones do not flicker."""

from __future__ import annotations

from typing import Optional

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QSizePolicy, QWidget

from workbench.jobs import Job

SHOW_AFTER_S = 0.4
POLL_MS = 150


class JobIndicator(QWidget):
    def __init__(self, tasks, parent=None) -> None:
        super().__init__(parent)
        self.tasks = tasks
        self.label = QLabel("")
        self.bar = QProgressBar()
        self.bar.setMaximumWidth(160)
        self.bar.setTextVisible(False)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop this work: a solve stops within one iteration, a loop between its "
                                      "steps, a file read when it is done; nothing of it is shown")
        self.cancel_button.clicked.connect(self.cancel)
        self.cancel_button.setSizePolicy(QSizePolicy.Policy.Fixed, QSizePolicy.Policy.Fixed)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.label)
        row.addWidget(self.bar)
        row.addWidget(self.cancel_button)
        self.job: Optional[Job] = None
        self.timer = QTimer(self)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.poll)
        self.timer.start()
        self.poll()

    def watch(self, job: Job) -> None:
        """A job was just submitted: poll now (it shows once it has run :data:`SHOW_AFTER_S`)."""
        self.poll()

    def poll(self) -> None:
        jobs = self.tasks.active_jobs()
        job = jobs[0] if jobs else None  # the oldest is the one running; the others wait behind it
        self.job = job
        if job is None:
            self.setVisible(False)
            return
        if job.seconds() < SHOW_AFTER_S and not self.isVisible():
            return
        done, total, _detail = job.progress()
        queued = f" (+{len(jobs) - 1} queued)" if len(jobs) > 1 else ""
        self.label.setText(f"{job.describe()} {job.seconds():.0f} s{queued}")
        if total:
            self.bar.setRange(0, total)
            self.bar.setValue(done)
        else:
            self.bar.setRange(0, 0)  # busy: the amount of work is not known
        self.cancel_button.setEnabled(job.cancellable and not job.cancelled)
        self.setVisible(True)

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.poll()
