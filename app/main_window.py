"""The main window: composes the panels as docks around the one current config.

Data flow (DESIGN.md): the model panel edits a draft; each valid edit replaces
``MainWindow.config`` and emits ``config_changed`` once; cheap panels recompute synchronously.
"""

from __future__ import annotations

import threading

from PySide6.QtCore import QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QDockWidget,
    QFileDialog,
    QLabel,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QWidget,
)

from unitscale_core import __version__
from unitscale_core.config import ConfigError, ModelConfig, load, loads, save

from .panels.attention_panel import AttentionPanel
from .panels.model_panel import ModelPanel
from .panels.positional_panel import PositionalPanel
from .panels.scaling_panel import ScalingPanel
from .panels.sizes_panel import SizesPanel
from .worker import Worker

SETTINGS_ORG = "UnitScalingExplorer"
#: torch's import holds the GIL for about a second; start it after the first paint.
DEVICE_LOOKUP_DELAY_MS = 400
SETTINGS_APP = "unitscale-explorer"


class MainWindow(QMainWindow):
    """``MainWindow()`` opens on the default config; ``config`` is always the last valid one."""

    config_changed = Signal(object)  # ModelConfig
    device_described = Signal(str)

    def __init__(self, config: ModelConfig | None = None, *, restore_settings: bool = False):
        super().__init__()
        self.setObjectName("mainWindow")
        self.setWindowTitle(f"Unit Scaling Explorer {__version__}")
        self._config = config or ModelConfig()
        if restore_settings and config is None:
            self._config = self._saved_config() or self._config

        self.worker = Worker(self)
        self.model_panel = ModelPanel(self._config)
        self.sizes_panel = SizesPanel(self._config)
        self.positional_panel = PositionalPanel(self._config, self.worker)
        self.scaling_panel = ScalingPanel(self._config, self.worker)
        self.attention_panel = AttentionPanel(self._config, self.worker)
        self.model_panel.edited.connect(self.set_config)
        for panel in (self.sizes_panel, self.positional_panel, self.scaling_panel,
                      self.attention_panel):
            self.config_changed.connect(panel.update_config)

        central = QWidget()  # docks fill the window; the central area stays empty
        central.setMaximumSize(0, 0)
        self.setCentralWidget(central)
        self.setDockNestingEnabled(True)
        self.docks: dict[str, QDockWidget] = {}
        self._add_dock("Model", self.model_panel, Qt.DockWidgetArea.LeftDockWidgetArea)
        self._add_dock("Scaling", self.scaling_panel, Qt.DockWidgetArea.RightDockWidgetArea)
        self._add_dock("Sizes", self.sizes_panel, Qt.DockWidgetArea.RightDockWidgetArea)
        self._add_dock("Positional", self.positional_panel, Qt.DockWidgetArea.RightDockWidgetArea)
        self.splitDockWidget(self.docks["Scaling"], self.docks["Sizes"], Qt.Orientation.Vertical)
        self.splitDockWidget(self.docks["Sizes"], self.docks["Positional"],
                             Qt.Orientation.Horizontal)
        self._add_dock("Attention", self.attention_panel, Qt.DockWidgetArea.RightDockWidgetArea)
        # attention runs a model: only while its tab is on screen (a hidden tab costs nothing)
        self.attention_panel.set_active(False)
        self.docks["Attention"].visibilityChanged.connect(self.attention_panel.set_active)
        self.tabifyDockWidget(self.docks["Positional"], self.docks["Attention"])
        self.docks["Positional"].raise_()
        self.resizeDocks([self.docks["Model"]], [340], Qt.Orientation.Horizontal)
        self.resizeDocks([self.docks["Scaling"], self.docks["Sizes"]], [540, 420],
                         Qt.Orientation.Vertical)
        self.resizeDocks([self.docks["Sizes"], self.docks["Positional"]], [500, 720],
                         Qt.Orientation.Horizontal)
        self._default_state = self.saveState()
        self._build_menus()

        self.busy = QProgressBar(objectName="busyIndicator", maximumWidth=120)
        self.busy.setRange(0, 0)  # indeterminate
        self.busy.setToolTip("The worker is running a job")
        self.cancel_button = QPushButton("Cancel", objectName="cancelButton")
        self.cancel_button.setToolTip("Cancel the running job (Esc)")
        self.cancel_button.setShortcut(QKeySequence(Qt.Key.Key_Escape))
        self.cancel_button.clicked.connect(lambda: self.worker.cancel())
        for w in (self.busy, self.cancel_button):
            w.hide()
            self.statusBar().addPermanentWidget(w)
        self.worker.started_job.connect(self._on_job_started)
        self.worker.finished_job.connect(self._on_job_done)
        self.worker.cancelled_job.connect(self._on_job_done)
        self.worker.failed_job.connect(self._on_job_failed)
        self.device_label = QLabel("device: looking…", objectName="deviceLabel")
        self.statusBar().addPermanentWidget(self.device_label)
        self.device_described.connect(self.device_label.setText)
        self._device_thread = threading.Thread(target=self._describe_device, daemon=True)
        QTimer.singleShot(DEVICE_LOOKUP_DELAY_MS, self._start_device_lookup)
        self._remember = restore_settings
        if restore_settings:
            self._restore_layout()

    # -- config ------------------------------------------------------------------------------
    @property
    def config(self) -> ModelConfig:
        return self._config

    def set_config(self, config: ModelConfig) -> None:
        """Make ``config`` current and tell every consumer once (no-op when unchanged)."""
        if config == self._config:
            return
        self._config = config
        if self.sender() is not self.model_panel:
            self.model_panel.set_config(config)
        self.config_changed.emit(config)
        self.statusBar().showMessage("config updated", 1500)

    # -- docks and menus -----------------------------------------------------------------------
    def _add_dock(self, title: str, panel: QWidget, area: Qt.DockWidgetArea) -> None:
        dock = QDockWidget(title, self)
        dock.setObjectName(f"{panel.objectName()}Dock")
        dock.setWidget(panel)
        self.addDockWidget(area, dock)
        self.docks[title] = dock

    def _build_menus(self) -> None:
        file_menu = self.menuBar().addMenu("&File")
        open_action = QAction("&Open config…", self, shortcut=QKeySequence.StandardKey.Open)
        open_action.triggered.connect(self._open_dialog)
        file_menu.addAction(open_action)
        save_action = QAction("&Save config as…", self, shortcut=QKeySequence.StandardKey.Save)
        save_action.triggered.connect(self._save_dialog)
        file_menu.addAction(save_action)
        file_menu.addSeparator()
        quit_action = QAction("&Quit", self, shortcut=QKeySequence.StandardKey.Quit)
        quit_action.triggered.connect(self.close)
        file_menu.addAction(quit_action)

        view = self.menuBar().addMenu("&View")
        for i, (title, dock) in enumerate(self.docks.items(), start=1):
            action = dock.toggleViewAction()
            action.setShortcut(QKeySequence(f"Ctrl+{i}"))
            action.setText(f"{title} panel")
            view.addAction(action)
        view.addSeparator()
        reset = QAction("Restore default layout", self)
        reset.triggered.connect(self.restore_default_layout)
        view.addAction(reset)

        help_menu = self.menuBar().addMenu("&Help")
        about = QAction("About", self)
        about.triggered.connect(lambda: QMessageBox.about(
            self, "Unit Scaling Explorer",
            f"Unit Scaling Explorer {__version__}\nSizes and scales of Transformer tensors."))
        help_menu.addAction(about)

    def open_config(self, path: str) -> bool:
        """Load a config file; on error say why in the status bar and keep the current one."""
        try:
            config = load(path)
        except ConfigError as exc:
            self.statusBar().showMessage(f"Could not open {path}: {exc}")
            return False
        self.set_config(config)
        self.statusBar().showMessage(f"Opened {path}", 3000)
        return True

    def save_config(self, path: str) -> bool:
        """Write the current config atomically (JSON or TOML by suffix)."""
        try:
            save(self._config, path)
        except (ConfigError, OSError) as exc:
            self.statusBar().showMessage(f"Could not save {path}: {exc}")
            return False
        self.statusBar().showMessage(f"Saved {path}", 3000)
        return True

    def _open_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open config", "",
                                              "Configs (*.json *.toml);;All files (*)")
        if path:
            self.open_config(path)

    def _save_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save config as", "model.json",
                                              "JSON (*.json);;TOML (*.toml)")
        if path:
            self.save_config(path)

    def restore_default_layout(self) -> None:
        for dock in self.docks.values():
            dock.show()
        self.restoreState(self._default_state)

    # -- worker feedback ---------------------------------------------------------------------------
    def _on_job_started(self, channel: str, _request_id: int) -> None:
        self.busy.show()
        self.cancel_button.show()
        self.statusBar().showMessage(f"running {channel}…")

    def _on_job_done(self, *_args) -> None:
        if not self.worker.busy():
            self.busy.hide()
            self.cancel_button.hide()
            self.statusBar().clearMessage()

    def _on_job_failed(self, channel: str, request_id: int, message: str) -> None:
        self._on_job_done()
        self.statusBar().showMessage(f"{channel} failed: {message}", 10_000)

    # -- device --------------------------------------------------------------------------------
    def _describe_device(self) -> None:
        from .device_info import describe_device

        try:
            text = describe_device(self._config.device)
        except Exception as exc:  # torch missing or broken: say so, keep the window
            text = f"torch unavailable: {exc}"
        try:  # a queued signal: the label is set on the main thread
            self.device_described.emit(text)
        except RuntimeError:
            pass  # the window was closed before torch answered

    def wait_for_background(self, timeout: float = 30.0) -> None:
        """Block until background start-up work is done (used by ``--screenshot``)."""
        self._start_device_lookup()
        self._device_thread.join(timeout)

    def _start_device_lookup(self) -> None:
        if self._device_thread.ident is None:  # not started yet
            self._device_thread.start()

    # -- settings ------------------------------------------------------------------------------
    @staticmethod
    def _settings() -> QSettings:
        return QSettings(SETTINGS_ORG, SETTINGS_APP)

    def _saved_config(self) -> ModelConfig | None:
        text = self._settings().value("last_config")
        if not isinstance(text, str):
            return None
        try:
            return loads(text, "json", source="saved settings")
        except ConfigError:
            return None  # a stale or damaged setting: start on defaults

    def _restore_layout(self) -> None:
        settings = self._settings()
        geometry, state = settings.value("geometry"), settings.value("window_state")
        if geometry is not None:
            self.restoreGeometry(geometry)
        if state is not None:
            self.restoreState(state)

    def save_settings(self) -> None:
        from unitscale_core.config import dumps_json

        settings = self._settings()
        settings.setValue("last_config", dumps_json(self._config))
        settings.setValue("geometry", self.saveGeometry())
        settings.setValue("window_state", self.saveState())

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        if self._remember:
            self.save_settings()
        # A running job is cancelled and the thread normally ends within 2 s. A job stuck in
        # something uncancellable (torch's first import, a model build) is waited for: Qt
        # aborts the process if a running QThread is destroyed.
        if not self.worker.stop(2000):
            self.statusBar().showMessage("waiting for the running job to finish…")
            self.worker.wait()
        super().closeEvent(event)
