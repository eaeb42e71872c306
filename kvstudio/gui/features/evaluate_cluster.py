"""The Evaluate view's "run on" choice: this machine, or the workers of a Ray cluster.

On a cluster the sweep is the same task on the model's thread (it waits for cells instead of
computing them): the cells come back into this machine's store and run history as they finish, and
the view draws them as it draws local ones. The workers stay for the next sweep (they keep the model
loaded); Ray is disconnected when the studio quits. core/evaluate/cluster.py has the rest.
"""

from __future__ import annotations

from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLineEdit, QSpinBox, QVBoxLayout, QWidget

from kvstudio.core.evaluate.cluster import ClusterTarget

THIS_MACHINE, RAY = "this machine", "a Ray address"


class RunOnForm(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.where = QComboBox()
        self.where.addItems([THIS_MACHINE, RAY])
        self.where.setToolTip("compute the cells here, or on the workers of a Ray cluster (the cluster extra: "
                              "pip install 'kvstudio[cluster]'); either way they are stored here")
        self.address = QLineEdit("auto")
        self.address.setPlaceholderText("auto, local, host:6379 or ray://host:10001")
        self.address.setToolTip("auto: the cluster this machine is part of; local: start Ray here; or the "
                                "address of a cluster's head")
        self.workers = QSpinBox(minimum=0, maximum=4096, value=0)
        self.workers.setSpecialValueText("auto")
        self.workers.setToolTip("workers, each loading the model once (auto: one per GPU; without GPUs, one per "
                                "node)")
        self.workers.setSuffix(" workers")
        cluster_row = QHBoxLayout()
        cluster_row.setContentsMargins(0, 0, 0, 0)
        cluster_row.addWidget(self.address, 1)
        cluster_row.addWidget(self.workers)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.where)
        layout.addLayout(cluster_row)
        self.where.currentTextChanged.connect(self._chosen)
        self._chosen(self.where.currentText())

    def _chosen(self, where: str) -> None:
        for widget in (self.address, self.workers):
            widget.setEnabled(where == RAY)

    def target(self) -> ClusterTarget | None:
        """None: this machine."""
        if self.where.currentText() != RAY:
            return None
        return ClusterTarget(self.address.text().strip() or "auto", self.workers.value() or None)
