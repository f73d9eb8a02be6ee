"""The main window: composes the panels as docks around the one current config.

Data flow (DESIGN.md): the model panel edits a draft; each valid edit replaces
``MainWindow.config`` and emits ``config_changed`` once; cheap panels recompute synchronously.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from PySide6.QtCore import QByteArray, QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
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
from unitscale_core.config import (
    MAX_CONFIG_BYTES,
    ConfigError,
    ModelConfig,
    dumps_json,
    load_with_warnings,
    loads,
    save,
)
from unitscale_core.hf_config import is_hf_config

from .export import (
    EXPORT_FOLDER_KEY,
    copy_image,
    default_export_folder,
    first_figure,
    menu_for,
    remember_folders_in,
    set_export_folder,
)
from .panels.attention_panel import AttentionPanel
from .panels.model_panel import ModelPanel
from .panels.positional_panel import PositionalPanel
from .panels.scaling_panel import ScalingPanel
from .panels.sizes_panel import SizesPanel
from .panels.training_panel import TrainingPanel
from .settings_file import keep_damaged_copy, settings_damage
from .widgets.controls_state import limit_text_inputs
from .worker import Worker

SETTINGS_ORG = "UnitScalingExplorer"
#: torch's import holds the GIL for about a second; start it after the first paint.
DEVICE_LOOKUP_DELAY_MS = 400
WARM_UP_CHANNEL = "warmup"
SETTINGS_APP = "unitscale-explorer"
#: Files listed under File → Open Recent.
MAX_RECENT = 8
#: Longest settings text read back (a config is ~600 bytes; a panel's state well under 4 kB).
MAX_SETTING_CHARS = 100_000
NOTICE_MS = 60_000
#: The model editor's share of the width in the default layout (its fields fit in ~320 px).
MODEL_DOCK_WIDTH = 340
#: Largest default window (a bigger screen leaves room around it).
DEFAULT_MAX_SIZE = (1800, 1100)
CONFIG_FILTER = "Configs and Hugging Face config.json (*.json *.toml);;All files (*)"
SAVE_FILTERS = {"JSON (*.json)": ".json", "TOML (*.toml)": ".toml"}

log = logging.getLogger(__name__)

#: how long a job's failure stays on the status bar (seconds)
FAILURE_SHOWN_S = 10.0


def hf_source(path: str | Path) -> Path | None:
    """The Hugging Face ``config.json`` behind ``path`` (a folder holding one, or the file
    itself when it names a ``model_type``), else None. Only reads what :func:`load` already
    accepted; anything unreadable is not a Hugging Face file."""
    path = Path(path)
    try:
        file = path / "config.json" if path.is_dir() else path
        if file.suffix.lower() != ".json" or not file.is_file():
            return None
        if file.stat().st_size > MAX_CONFIG_BYTES:
            return None
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return file.resolve() if is_hf_config(data) else None


def _still_there(path: str) -> bool:
    """An Open Recent entry that can still be opened: a file, or a folder (a Hugging Face
    model folder)."""
    try:
        return Path(path).is_file() or Path(path).is_dir()
    except (OSError, ValueError):
        return False


def job_label(channel: str) -> str:
    """A worker channel as the status bar names it: ``training.1`` is "training run B" (the
    training panel's runs are channels ``training.0`` …), ``training.attention`` "training
    attention maps"; other channels are already words (``measure``, ``attention``)."""
    head, _, tail = channel.partition(".")
    if head == "training" and tail.isdigit() and int(tail) < 26:
        return f"training run {chr(ord('A') + int(tail))}"
    if head == "training" and tail == "attention":
        return "training attention maps"
    return channel.replace(".", " ")


def _warm_up_then_freeze(cfg: ModelConfig, check_cancelled=None) -> ModelConfig:
    """The worker's warm-up (:func:`unitscale_core.warmup.warm_up`), then the heap frozen out
    of the cyclic garbage collector (``gc.freeze``, also after a failed warm-up). What the
    heap holds by then (torch, Qt, pyqtgraph, the cached model: 0.37 M objects) lives as
    long as the program; the first full collection after start-up traversed it all, 230 ms
    holding the GIL, and stalled the window as long during the first measurement
    (``benchmarks/ui_stall.py``). Frozen, it is never traversed again. Nothing is kept that
    a collection would free: a full one at this point finds no unreachable object (and
    takes 190 ms, which is why it is not run here)."""
    from unitscale_core.warmup import warm_up

    try:
        return warm_up(cfg, check_cancelled=check_cancelled)
    finally:
        gc.freeze()


class MainWindow(QMainWindow):
    """``MainWindow()`` opens on the default config; ``config`` is always the last valid one."""

    config_changed = Signal(object)  # ModelConfig
    device_described = Signal(str)
    #: The program sets this: it ends the process with ``os._exit`` as soon as the event loop
    #: returns (app/__main__.py), so on close a job that does not stop within a second is left
    #: to die with the process instead of being waited for. Elsewhere (tests) a running QThread
    #: must never be destroyed (Qt aborts), so the close waits for the job.
    exits_process = False

    def __init__(self, config: ModelConfig | None = None, *, restore_settings: bool = False,
                 settings: QSettings | None = None, confirm_unsaved: bool | None = None,
                 path: str | Path | None = None, warm_up: bool = False):
        """``restore_settings``: the program's session — reopen the last config, file,
        layout and panel choices from ``settings`` (default: the user's QSettings) and save
        them on close. ``confirm_unsaved`` (default: ``restore_settings``): ask before
        unsaved changes are dropped (quit, New, Open). ``path``: the file ``config`` was
        read from (it becomes this session's file). ``warm_up``: once the device is known, the
        worker pays torch's one-time costs (:mod:`unitscale_core.warmup`) so the first
        Measure does not stall the window; the program passes it, tests need not."""
        super().__init__()
        self.setObjectName("mainWindow")
        self._settings_store = settings
        self._remember = restore_settings
        self._confirm = restore_settings if confirm_unsaved is None else confirm_unsaved
        self._path: Path | None = None  # the file the config was opened from or saved to
        # a Hugging Face config.json the config was imported from: never the session's file
        # (Save would overwrite it in our format), so the session is untitled until saved
        self._imported: Path | None = None
        self.import_warnings: list[str] = []  # what the last import does not compute faithfully
        self.import_box: QMessageBox | None = None  # the dialog listing them
        self._import_notice = ""  # the notice line that names them, while shown
        self._clean = ModelConfig()  # that file's config (untitled: the defaults)
        self._recent: list[str] = []
        self.problems: list[str] = []  # what could not be restored, for the notice
        self.settings_damage = ""  # what was wrong with the settings file at start, if any
        self._settings_saved = True  # False: the damaged file could not be kept; never write
        self._scratch: tempfile.TemporaryDirectory | None = None
        if restore_settings:  # checked before anything reads it (a FIFO would block Qt)
            self._settings_store = self._open_settings(settings)
        self._config = config or ModelConfig()
        if path is not None and config is not None:
            self._clean = config
            self._imported = hf_source(path)
            if self._imported is None:
                self._path = Path(path).resolve()
        self._restored = restore_settings and config is None  # the last session's config
        if self._restored:
            self._config = self._saved_config() or self._config

        self.worker = Worker(self)
        self.model_panel = ModelPanel(self._config)
        self.sizes_panel = SizesPanel(self._config)
        self.positional_panel = PositionalPanel(self._config, self.worker)
        self.scaling_panel = ScalingPanel(self._config, self.worker)
        self.attention_panel = AttentionPanel(self._config, self.worker)
        self.training_panel = TrainingPanel(self._config, self.worker)
        self.model_panel.edited.connect(self.set_config)
        self.model_panel.draft_invalid.connect(self._on_draft_invalid)
        for panel in (self.sizes_panel, self.positional_panel, self.scaling_panel,
                      self.attention_panel, self.training_panel):
            self.config_changed.connect(panel.update_config)
        for panel in (self.positional_panel, self.scaling_panel, self.attention_panel):
            limit_text_inputs(panel)  # a saved text is restored only up to MAX_TEXT

        central = QWidget()  # docks fill the window; the central area stays empty
        central.setMaximumSize(0, 0)
        self.setCentralWidget(central)
        self.setDockNestingEnabled(True)
        self.docks: dict[str, QDockWidget] = {}
        # The model editor at the side; the views (Scaling, Sizes, Positional, Attention,
        # Training) as tabs filling the rest, so each gets the whole height (four side by
        # side left the scale chart ~110 px at 1636×800). Dragging a tab out splits the
        # views; the layout is remembered with the window.
        right = Qt.DockWidgetArea.RightDockWidgetArea
        self._add_dock("Model", self.model_panel, Qt.DockWidgetArea.LeftDockWidgetArea)
        self._add_dock("Scaling", self.scaling_panel, right)
        for title, panel in (("Sizes", self.sizes_panel), ("Positional", self.positional_panel),
                             ("Attention", self.attention_panel),
                             ("Training", self.training_panel)):  # (training keeps running
            self._add_dock(title, panel, right)  # while its tab is hidden, unlike attention)
            self.tabifyDockWidget(self.docks["Scaling"], self.docks[title])
        # attention runs a model: only while its tab is on screen (a hidden tab costs nothing)
        self.attention_panel.set_active(False)
        self.docks["Attention"].visibilityChanged.connect(self.attention_panel.set_active)
        # so does the positional panel's learned table (a model build: ~1 s for GPT-2 small)
        self.positional_panel.set_active(False)
        self.docks["Positional"].visibilityChanged.connect(self.positional_panel.set_active)
        self.docks["Scaling"].raise_()
        self.resizeDocks([self.docks["Model"]], [MODEL_DOCK_WIDTH], Qt.Orientation.Horizontal)
        self._fit_to_screen()
        self._default_state = self.saveState()
        self._build_menus()

        self.busy = QProgressBar(objectName="busyIndicator", maximumWidth=120)
        self.busy.setRange(0, 0)  # indeterminate
        self.busy.setToolTip("The worker is running a job")
        self.cancel_button = QPushButton("Cancel", objectName="cancelButton")
        self.cancel_button.setToolTip("Cancel the running job (Esc)")
        self.cancel_button.setShortcut(QKeySequence(Qt.Key.Key_Escape))
        self.cancel_button.clicked.connect(self.cancel_jobs)
        for w in (self.busy, self.cancel_button):
            w.hide()
            self.statusBar().addPermanentWidget(w)
        self._running_text = ""  # the "running …" message this window shows, if any
        # the last job failure's message and when its 10 s on the status bar end: a job that
        # starts meanwhile shows "running …" over it, and its end brings the failure back
        self._failure: tuple[str, float] | None = None
        # the indicator follows the worker's own activity (any route: finished, failed,
        # cancelled, stopped, replaced or dropped before it started), never a count of signals
        self.worker.activity_changed.connect(self._on_activity)
        self.worker.failed_job.connect(self._on_job_failed)
        self.device_label = QLabel("device: looking…", objectName="deviceLabel")
        self.statusBar().addPermanentWidget(self.device_label)
        self.device_described.connect(self.device_label.setText)
        self._warm_up = warm_up
        self.device_described.connect(self._start_warm_up)
        # not a daemon: a daemon thread still importing torch when the interpreter exits is
        # stopped inside C++ (std::terminate, the process aborts); a window closed within the
        # first seconds now lets the process end once the import is done
        self._device_thread = threading.Thread(target=self._describe_device, daemon=False,
                                               name="describeDevice")
        QTimer.singleShot(DEVICE_LOOKUP_DELAY_MS, self._start_device_lookup)
        self.notice = QLabel(objectName="noticeLabel")  # what could not be opened or restored
        self.notice.setStyleSheet("color: #b71c1c;")
        self.statusBar().addWidget(self.notice, 1)
        self._notice_timer = QTimer(self, singleShot=True, interval=NOTICE_MS)
        self._notice_timer.timeout.connect(self.notice.clear)
        self._last_panel: QWidget = self.scaling_panel  # Edit → Copy as image's target
        app = QApplication.instance()
        if app is not None:
            app.focusChanged.connect(self._on_focus)
        if restore_settings:
            self._restore_session()
        if self._imported is not None and path is not None:  # --config of a Hugging Face
            try:  # config.json: list what it does not compute faithfully, as Open does
                self._announce_import(load_with_warnings(path)[1])
            except ConfigError:
                pass  # read a moment ago; changed since: the config shown stays
        self._update_title()

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
        self._update_title()

    def _on_draft_invalid(self, reason: str) -> None:
        """While the model panel's draft is invalid, the panels that show the last valid
        config say so (``set_stale``); ``""``: the draft is valid and shown again."""
        for panel in self._panels():
            if hasattr(panel, "set_stale"):
                panel.set_stale(reason)

    # -- files ---------------------------------------------------------------------------------
    @property
    def path(self) -> Path | None:
        """The config file of this session (None: untitled)."""
        return self._path

    def is_modified(self) -> bool:
        """True when the config differs from its file's (untitled: from the defaults)."""
        return self._config != self._clean

    def imported_from(self) -> Path | None:
        """The Hugging Face config.json of this (untitled) session, if it was imported."""
        return self._imported if self._path is None else None

    def export_config_name(self) -> str:
        """What an export's proposed file name calls the config: this session's file, the
        imported model, the preset the fields still equal, else its shape
        ("decoder-2x64": architecture, layers × d_model)."""
        if self._path is not None:
            return self._path.stem
        if self.imported_from() is not None:
            return Path(_import_name(self._imported)).stem
        preset = self.model_panel.preset_key()
        if preset is not None:
            return preset
        cfg = self._config
        return f"{cfg.architecture}-{cfg.n_layers}x{cfg.d_model}"

    def _update_title(self) -> None:
        name = self._path.name if self._path is not None else "untitled"
        if self.imported_from() is not None:
            name = f"{_import_name(self._imported)} (imported from Hugging Face)"
        # Qt shows "*" in place of "[*]" while the window is modified
        self.setWindowTitle(f"{name}[*] — Unit Scaling Explorer {__version__}")
        self.setWindowModified(self.is_modified())
        self.setWindowFilePath(str(self._path) if self._path is not None else "")

    def notify(self, text: str) -> None:
        """A one-line message that stays in the status bar (a minute) until replaced."""
        log.warning("%s", text)
        self.notice.setText(text)
        self.notice.setToolTip(text)
        self._notice_timer.start()

    def new_config(self) -> bool:
        """Start an untitled session on the default config (asks about unsaved changes)."""
        if not self.maybe_save("start a new config"):
            return False
        self._path = self._imported = None
        self._clean = ModelConfig()
        self.set_config(ModelConfig())
        self._announce_import([])
        self._update_title()
        return True

    def maybe_save(self, action: str = "continue") -> bool:
        """With unsaved changes, ask Save / Discard / Cancel; True when ``action`` may go on.
        Never asks unless the window confirms (the program does; tests' windows do not)."""
        if not self._confirm or not self.is_modified():
            return True
        name = self._path.name if self._path is not None else "the untitled config"
        answer = QMessageBox.question(
            self, "Unsaved changes", f"Save the changes to {name} before you {action}?",
            QMessageBox.StandardButton.Save | QMessageBox.StandardButton.Discard
            | QMessageBox.StandardButton.Cancel, QMessageBox.StandardButton.Save)
        if answer == QMessageBox.StandardButton.Save:
            return self.save()
        return answer == QMessageBox.StandardButton.Discard

    # -- docks and menus -----------------------------------------------------------------------
    def _add_dock(self, title: str, panel: QWidget, area: Qt.DockWidgetArea) -> None:
        dock = QDockWidget(title, self)
        dock.setObjectName(f"{panel.objectName()}Dock")
        dock.setWidget(panel)
        self.addDockWidget(area, dock)
        self.docks[title] = dock

    def _build_menus(self) -> None:
        file_menu = self.menuBar().addMenu("&File")
        file_menu.setObjectName("fileMenu")

        def action(text: str, slot, shortcut=None, name: str = "") -> QAction:
            act = QAction(text, self, objectName=name)
            if shortcut is not None:
                act.setShortcut(QKeySequence(shortcut))
            act.triggered.connect(lambda _=False: slot())
            file_menu.addAction(act)
            return act

        action("&New", self.new_config, QKeySequence.StandardKey.New, "newAction")
        action("&Open…", self._open_dialog, QKeySequence.StandardKey.Open, "openAction")
        action("Open &Hugging Face model folder…", self._open_folder_dialog, None,
               "openHfFolderAction").setToolTip(
            "Import a Hugging Face model folder's config.json (it is only read)")
        self.recent_menu = file_menu.addMenu("Open &Recent")
        self.recent_menu.setObjectName("recentMenu")
        self.recent_menu.aboutToShow.connect(self._fill_recent_menu)
        action("&Save", self.save, QKeySequence.StandardKey.Save, "saveAction")
        action("Save &As…", self._save_dialog, "Ctrl+Shift+S", "saveAsAction")
        file_menu.addSeparator()
        export_menu = file_menu.addMenu("&Export")
        export_menu.setObjectName("exportMenu")
        for title, dock in self.docks.items():
            panel = dock.widget()
            own = getattr(panel, "export_button", None)  # the training panel's own menu
            if hasattr(panel, "export_items"):
                sub = export_menu.addMenu(title)
                menu_for(panel, panel.export_items, sub)
            elif own is not None and own.menu() is not None:
                sub = export_menu.addMenu(title)  # the same actions as its Export button
                sub.addActions(own.menu().actions())
            else:
                continue
            sub.setObjectName(f"export{title}Menu")
            # what is exported is what is on screen: a panel behind another tab is not
            # laid out (its PNG came out 1636×162) and stops updating (the positional
            # view still showed the previous config's rope), so its tab comes to the front
            sub.aboutToShow.connect(lambda d=dock: self.show_dock(d))
        file_menu.addSeparator()
        action("&Quit", self.close, "Ctrl+Q", "quitAction")  # StandardKey.Quit: empty on some

        edit = self.menuBar().addMenu("&Edit")
        copy = QAction("Copy as &image", self, objectName="copyImageAction",
                       shortcut=QKeySequence("Ctrl+Shift+C"))
        copy.setToolTip("Copy the focused panel's figure (or the panel) to the clipboard")
        copy.triggered.connect(lambda _=False: self.copy_focused_image())
        edit.addAction(copy)

        view = self.menuBar().addMenu("&View")
        for i, (title, dock) in enumerate(self.docks.items(), start=1):
            # shows the panel and brings its tab to the front (a dock's own toggle action
            # would close a panel that is merely behind another tab)
            show = QAction(f"{title} panel", self, objectName=f"show{title}Action",
                           shortcut=QKeySequence(f"Ctrl+{i}"))
            show.triggered.connect(lambda _=False, d=dock: self.show_dock(d))
            view.addAction(show)
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

    def open_config(self, path: str | Path) -> bool:
        """Load a config file, or import a Hugging Face ``config.json`` or a folder holding
        one; on error say why in one line (status bar) and keep the current config. The file
        is only read. An import leaves the session untitled (Save asks where, never onto the
        config.json) and lists what it does not compute faithfully (:attr:`import_warnings`:
        the notice and a dialog, one line each)."""
        try:
            config, warnings = load_with_warnings(path)
        except ConfigError as exc:
            message = f"Could not open {Path(path).name}: {_first_line(exc)}"
            self.statusBar().showMessage(message)
            self.notify(message)
            return False
        source = hf_source(path)
        self._path = None if source is not None else Path(path).resolve()
        self._imported = source
        self._clean = config
        self.set_config(config)
        self._add_recent(Path(path).resolve())
        self._update_title()
        if source is not None:
            self._announce_import(warnings)
        else:
            self._announce_import([])
            self.statusBar().showMessage(f"Opened {path}", 3000)
        return True

    def _announce_import(self, warnings: list[str]) -> None:
        """Say that a Hugging Face config was imported and what it does not compute as the
        checkpoint's model does: the notice (one line, all of them in its tooltip) and a
        dialog listing each line that does not block the window. ``[]`` outside an import
        closes the previous import's dialog."""
        self.import_warnings = list(warnings)
        if self.import_box is not None:
            self.import_box.close()
            self.import_box = None
        if self._import_notice and self.notice.text() == self._import_notice:
            self.notice.clear()  # the previous import's line would name the wrong config
        self._import_notice = ""
        if self.imported_from() is None:
            return
        name = _import_name(self._imported)
        if not warnings:
            self.statusBar().showMessage(f"Imported {name} from Hugging Face; Save asks "
                                         "where to write the program's own file", 6000)
            return
        count = f"{len(warnings)} thing{'s' if len(warnings) > 1 else ''}"
        self.notify(f"Imported {name} with {count} not computed as the checkpoint's model "
                    f"does: {warnings[0]}" + (" (…)" if len(warnings) > 1 else ""))
        self.notice.setToolTip("\n".join(warnings))
        self._import_notice = self.notice.text()
        box = QMessageBox(QMessageBox.Icon.Warning, "Imported with warnings",
                          f"{name} was imported. The program does not compute {count} as "
                          "the checkpoint's model does:", QMessageBox.StandardButton.Ok, self)
        box.setObjectName("importWarnings")
        box.setInformativeText("\n".join(f"• {w}" for w in warnings))
        box.setWindowModality(Qt.WindowModality.NonModal)  # the window stays usable
        box.show()
        self.import_box = box

    def _refuses_target(self, path: Path) -> str:
        """Why ``path`` must not be written ("" when it may): the config.json this session
        was imported from, or any other Hugging Face config.json (Save writes the program's
        own format, which would destroy the checkpoint's config)."""
        target = path.resolve()
        if target == self._imported or (target.exists() and hf_source(target) is not None):
            return (f"{path.name} is a Hugging Face config.json; it is never overwritten "
                    "(save under another name)")
        return ""

    def save_config(self, path: str | Path) -> bool:
        """Write the current config atomically (JSON or TOML by suffix; the previous file is
        kept as NAME.bak.EXT) and make ``path`` this session's file."""
        refused = self._refuses_target(Path(path))
        if refused:
            message = f"Could not save {Path(path).name}: {refused}"
            self.statusBar().showMessage(message)
            self.notify(message)
            return False
        try:
            save(self._config, path)
        except (ConfigError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            message = f"Could not save {Path(path).name}: {reason}"
            self.statusBar().showMessage(message)
            self.notify(message)
            return False
        self._path = Path(path).resolve()
        self._imported = None
        self._clean = self._config
        self._add_recent(self._path)
        self._update_title()
        self.statusBar().showMessage(f"Saved {path}", 3000)
        return True

    def save(self) -> bool:
        """Save to this session's file, or ask where (Save As) when untitled (an imported
        Hugging Face config too: its config.json is never the target)."""
        if self._path is None:
            return self._save_dialog()
        return self.save_config(self._path)

    def _dialog_folder(self) -> str:
        """Where Open and Save As start: this session's file's folder, the last recent
        file's, else the Documents folder (never the working directory)."""
        if self._path is not None:
            return str(self._path.parent)
        if self._recent:
            return str(Path(self._recent[0]).parent)
        return str(default_export_folder())

    def _open_dialog(self) -> bool:
        if not self.maybe_save("open another config"):
            return False
        path, _ = QFileDialog.getOpenFileName(self, "Open config", self._dialog_folder(),
                                              CONFIG_FILTER)
        return bool(path) and self.open_config(path)

    def _open_folder_dialog(self) -> bool:
        """File → Open Hugging Face model folder…: a folder holding a config.json."""
        if not self.maybe_save("open another config"):
            return False
        path = QFileDialog.getExistingDirectory(self, "Open Hugging Face model folder",
                                                self._dialog_folder())
        return bool(path) and self.open_config(path)

    def suggested_save_path(self) -> Path:
        """Save As's starting name: this session's file; after a Hugging Face import a new
        name beside it (``FOLDER.json`` next to the model folder, ``NAME.unitscale.json``
        next to a config file of another name), never the config.json itself."""
        if self._path is not None:
            return self._path
        source = self.imported_from()
        if source is None:
            return Path(self._dialog_folder()) / f"{self.export_config_name()}.json"
        if source.name == "config.json":
            return source.parent.parent / f"{source.parent.name}.json"
        return source.with_name(f"{source.stem}.unitscale.json")

    def _save_dialog(self) -> bool:
        start = self.suggested_save_path()
        path, chosen = QFileDialog.getSaveFileName(self, "Save config as", str(start),
                                                   ";;".join(SAVE_FILTERS))
        if not path:
            return False
        if Path(path).suffix.lower() not in (".json", ".toml"):
            path += SAVE_FILTERS.get(chosen, ".json")
        return self.save_config(path)

    # -- recent files ------------------------------------------------------------------------
    def recent_files(self) -> list[str]:
        return list(self._recent)

    def _add_recent(self, path: Path) -> None:
        text = str(path)
        self._recent = [text] + [p for p in self._recent if p != text][: MAX_RECENT - 1]
        self._store_recent()

    def _store_recent(self) -> None:
        if self._remember:
            self._settings().setValue("recent_files", json.dumps(self._recent))

    def prune_recent(self) -> list[str]:
        """Drop files that no longer exist from Open Recent; say which. Returns them."""
        gone = [p for p in self._recent if not _still_there(p)]
        if gone:
            self._recent = [p for p in self._recent if p not in gone]
            self._store_recent()
            names = ", ".join(Path(p).name for p in gone)
            self.notify(f"Removed from Open Recent (no longer there): {names}")
        return gone

    def _fill_recent_menu(self) -> None:
        self.prune_recent()
        menu = self.recent_menu
        menu.clear()
        for i, path in enumerate(self._recent, start=1):
            act = menu.addAction(f"&{i} {Path(path).name}")
            act.setToolTip(path)
            act.setData(path)
            act.triggered.connect(lambda _=False, p=path: self.open_recent(p))
        if not self._recent:
            menu.addAction("(no recent files)").setEnabled(False)
        menu.addSeparator()
        clear = menu.addAction("Clear list")
        clear.setEnabled(bool(self._recent))
        clear.triggered.connect(self._clear_recent)

    def _clear_recent(self) -> None:
        self._recent = []
        self._store_recent()

    def open_recent(self, path: str) -> bool:
        """Open a file (or Hugging Face model folder) of the recent list; one that vanished
        is dropped with a message saying so."""
        if not _still_there(path):
            self.prune_recent()
            return False
        if not self.maybe_save("open another config"):
            return False
        return self.open_config(path)

    # -- copy as image ---------------------------------------------------------------------------
    def _panels(self) -> list[QWidget]:
        return [dock.widget() for dock in self.docks.values()]

    def _on_focus(self, _old, new) -> None:
        panel = self._panel_of(new)
        if panel is not None:
            self._last_panel = panel

    def _panel_of(self, widget: QWidget | None) -> QWidget | None:
        panels = self._panels()
        while widget is not None:
            if widget in panels:
                return widget
            widget = widget.parentWidget()
        return None

    def copy_focused_image(self):
        """Copy the focused panel's first figure (a panel without one: the panel itself) to
        the clipboard; the panel last focused when the focus is elsewhere. Returns the image."""
        panel = self._panel_of(QApplication.focusWidget()) or self._last_panel
        figure = first_figure(panel.export_items()) if hasattr(panel, "export_items") else None
        widget = figure.widget() if figure is not None else panel
        image = copy_image(widget)
        what = figure.label if figure is not None else f"{panel.objectName()} panel"
        self.statusBar().showMessage(f"Copied the {what} to the clipboard", 3000)
        return image

    def restore_default_layout(self) -> None:
        for dock in self.docks.values():
            dock.show()
        self.restoreState(self._default_state)
        self.docks["Scaling"].raise_()

    def show_dock(self, dock: QDockWidget) -> None:
        """Show ``dock`` (closed or behind another tab) in front."""
        dock.show()
        dock.raise_()

    def _fit_to_screen(self) -> None:
        """The default size: the screen's available area less a frame's margin, at most
        :data:`DEFAULT_MAX_SIZE`, centred (a saved geometry replaces it on restore)."""
        screen = self.screen() or QApplication.primaryScreen()
        if screen is None:
            return
        area = screen.availableGeometry()
        width = min(area.width() - 16, DEFAULT_MAX_SIZE[0])
        height = min(area.height() - 48, DEFAULT_MAX_SIZE[1])  # a title bar's room
        self.resize(width, height)
        self.move(area.x() + (area.width() - width) // 2,
                  area.y() + max(0, (area.height() - height - 32) // 2))

    # -- worker feedback ---------------------------------------------------------------------------
    def _start_warm_up(self, _device: str) -> None:
        if not self._warm_up:
            return
        self._warm_up = False  # once per session
        cfg, worker = self._config, self.worker
        worker.submit(WARM_UP_CHANNEL, _warm_up_then_freeze, cfg,
                      check_cancelled=worker.check_cancelled)

    def user_jobs(self) -> tuple[str, ...]:
        """The channels the busy indicator names: the worker's running and pending ones, less
        the warm-up (the user did not ask for it)."""
        return tuple(c for c in self.worker.activity() if c != WARM_UP_CHANNEL)

    def _on_activity(self, _activity=None) -> None:
        """Show the busy bar and Cancel while a user's job runs or waits; hide them at once
        when none is left. Reads the worker's state now: a queued signal's payload may be
        older than a direct one's."""
        jobs = self.user_jobs()
        self.busy.setVisible(bool(jobs))
        self.cancel_button.setVisible(bool(jobs))
        bar = self.statusBar()
        if jobs:
            more = f" (+{len(jobs) - 1} queued)" if len(jobs) > 1 else ""
            text = f"running {job_label(jobs[0])}…{more}"
            self.cancel_button.setToolTip(f"Cancel {', '.join(map(job_label, jobs))} (Esc)")
            if text != self._running_text or bar.currentMessage() != text:
                bar.showMessage(text)
            self._running_text = text
        else:
            if self._running_text and bar.currentMessage() == self._running_text:
                left = 0.0 if self._failure is None else self._failure[1] - time.monotonic()
                if left > 0.2:  # a failure the running text covered: shown again
                    bar.showMessage(self._failure[0], int(left * 1000))
                else:
                    bar.clearMessage()  # a newer message (e.g. a failure) stays
            self._running_text = ""

    def cancel_jobs(self) -> None:
        """Cancel: end the running job and drop the pending ones that the indicator names."""
        for channel in self.user_jobs():
            self.worker.cancel(channel)

    def _on_job_failed(self, channel: str, request_id: int, message: str) -> None:
        if channel == WARM_UP_CHANNEL:  # the user's own Measure will say what is wrong
            log.debug("warm-up failed: %s", message)
            return
        text = f"{channel} failed: {message}"
        self._failure = (text, time.monotonic() + FAILURE_SHOWN_S)
        self.statusBar().showMessage(text, int(FAILURE_SHOWN_S * 1000))

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
    def _settings(self) -> QSettings:
        """The session store: the one given to the constructor, else the user's QSettings."""
        if self._settings_store is not None:
            return self._settings_store
        return QSettings(SETTINGS_ORG, SETTINGS_APP)

    def _open_settings(self, given: QSettings | None) -> QSettings:
        """The session's store, its file checked first (:mod:`app.settings_file`). A damaged
        file is copied to ``NAME.damaged`` and the session starts on the defaults (the store
        is cleared, so the close writes a whole new file); where it cannot be read safely or
        no copy can be kept, a scratch store in a temporary folder stands in and nothing is
        written to it. Either way :attr:`settings_damage` says what and the notice shows it."""
        path = given.fileName() if given is not None else user_settings_path()
        if path is None:  # the registry (Windows) or a plist (macOS): Qt's own format checks
            return given if given is not None else QSettings(SETTINGS_ORG, SETTINGS_APP)
        reason, data = settings_damage(path)
        store = None
        if reason is None:
            store = given if given is not None else QSettings(SETTINGS_ORG, SETTINGS_APP)
            status = store.status()
            if status == QSettings.Status.NoError:
                return store
            reason = ("could not be read" if status == QSettings.Status.AccessError
                      else "is not in Qt's settings format")
        name = Path(path).name
        kept = None
        if data is not None:
            try:
                kept = keep_damaged_copy(path, data)
            except OSError as exc:
                reason += f" (no copy could be kept: {exc.strerror or exc})"
        if kept is not None:
            store = store or (given if given is not None else
                              QSettings(SETTINGS_ORG, SETTINGS_APP))
            store.clear()  # start on the defaults; the close writes a whole file
            self.settings_damage = (f"Settings file {name} {reason}: started on the defaults; "
                                    f"the damaged file is kept as {kept.name}")
            return store
        self._settings_saved = False
        self.settings_damage = (f"Settings file {name} {reason}: started on the defaults; it "
                                "is left as it is and this session's settings are not saved")
        self._scratch = tempfile.TemporaryDirectory(prefix="unitscale-settings-")
        return QSettings(str(Path(self._scratch.name) / "scratch.ini"),
                         QSettings.Format.IniFormat)

    def _setting_text(self, key: str) -> str | None:
        """A text setting, or None when absent; a value of another type or absurd length is
        a problem (noted) and reads as absent."""
        value = self._settings().value(key)
        if value is None:
            return None
        if not isinstance(value, str) or len(value) > MAX_SETTING_CHARS:
            self.problems.append(f"{key}: not a saved text")
            return None
        return value

    def _saved_config(self) -> ModelConfig | None:
        text = self._setting_text("last_config")
        if text is None:
            return None
        try:
            return loads(text, "json", source="the saved last config")
        except (ValueError, OverflowError, RecursionError) as exc:  # ConfigError and what a
            # damaged value could raise in the parser: never a crash at start-up
            self.problems.append(f"{_first_line(exc)}; started on the defaults")
            return None

    def _restore_session(self) -> None:
        """Recent files, this session's file, panel choices and the layout, from settings.
        Whatever is damaged is skipped and named in one line; nothing is written back
        until the window closes."""
        recent = self._setting_text("recent_files")
        if recent is not None:
            try:
                items = json.loads(recent)
            except (ValueError, RecursionError):  # also a >4300-digit integer
                items = None
            if isinstance(items, list) and all(isinstance(p, str) for p in items):
                self._recent = items[:MAX_RECENT]
            else:
                self.problems.append("recent_files: not a list of file names")
        folder = self._setting_text(EXPORT_FOLDER_KEY)
        if folder:  # where the last export went (a folder gone since is passed over)
            set_export_folder(folder, store=False)
        remember_folders_in(self._settings())  # each new export folder is written at once
        current = self._setting_text("current_file")
        if current and self._restored:
            # load() reads only a regular file of bounded size, never blocking (a FIFO here
            # hung the start-up); ValueError also covers a path Python cannot stat (NUL)
            try:
                self._clean = load_with_warnings(current)[0]
                # a Hugging Face config.json is never the session's file (see open_config)
                self._imported = hf_source(current)
                self._path = Path(current) if self._imported is None else None
            except ValueError as exc:
                name = Path(current).name if "\0" not in current else "the last file"
                self.problems.append(f"could not reopen {name[:60]}: {_first_line(exc)}")
        for dock in self.docks.values():
            panel = dock.widget()
            if not hasattr(panel, "restore_state"):
                continue
            text = self._setting_text(f"panels/{panel.objectName()}")
            if text is None:
                continue
            try:
                state = json.loads(text)
            except (ValueError, RecursionError):
                self.problems.append(f"{panel.objectName()}: saved choices are not JSON")
                continue
            try:
                problems = panel.restore_state(state)
            except (ValueError, TypeError, OverflowError, RecursionError) as exc:
                # each panel checks what it restores; this keeps one panel's oversight from
                # stopping the start-up
                log.warning("restoring %s failed", panel.objectName(), exc_info=True)
                problems = [f"saved choices could not be applied ({_first_line(exc)})"]
            self.problems += [f"{panel.objectName()}: {p}" for p in problems]
        self._restore_layout()
        if self._path is not None:
            self._add_recent(self._path)
        if self.settings_damage:
            self.notify(self.settings_damage)
        elif self.problems:
            more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
            self.notify(f"Some saved settings were skipped: {self.problems[0]}{more}")

    def _restore_layout(self) -> None:
        settings = self._settings()
        for key, restore in (("geometry", self.restoreGeometry),
                             ("window_state", self.restoreState)):
            value = settings.value(key)
            if value is None:
                continue
            if not isinstance(value, (QByteArray, bytes)) or not restore(QByteArray(value)):
                self.problems.append(f"{key}: not a saved window layout")

    def panel_states(self) -> dict[str, Any]:
        """Each panel's choices (those panels that keep any), by objectName."""
        return {d.widget().objectName(): d.widget().state() for d in self.docks.values()
                if hasattr(d.widget(), "state")}

    def save_settings(self) -> None:
        """Remember the config, its file, the recent list, panel choices and the layout
        (not when the settings file was damaged and could not be kept: it is left alone)."""
        if not self._settings_saved:
            return
        settings = self._settings()
        settings.setValue("last_config", dumps_json(self._config))
        settings.setValue("current_file", str(self._path) if self._path is not None else "")
        settings.setValue("recent_files", json.dumps(self._recent))
        for name, state in self.panel_states().items():
            settings.setValue(f"panels/{name}", json.dumps(state))
        settings.setValue("geometry", self.saveGeometry())
        settings.setValue("window_state", self.saveState())
        settings.sync()

    def running_work(self) -> str:
        """What would be lost by quitting now ("" when nothing runs): the worker's jobs, and
        a training run between two of its chunks."""
        channels = list(self.worker.activity())
        if self.training_panel.is_active() and not any(c.startswith("training")
                                                       for c in channels):
            channels.append("training")
        return ", ".join(dict.fromkeys(map(job_label, channels)))

    def confirm_quit_while_busy(self) -> bool:
        """Ask before quitting cancels running work; True to go on. Asks only where unsaved
        changes are confirmed too (the program; tests' windows never ask)."""
        running = self.running_work() if self._confirm else ""
        if not running:
            return True
        answer = QMessageBox.question(
            self, "Work is running", f"Quit and cancel the running work ({running})?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.Cancel,
            QMessageBox.StandardButton.Cancel)
        return answer == QMessageBox.StandardButton.Yes

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        if not self.maybe_save("quit") or not self.confirm_quit_while_busy():
            event.ignore()  # Cancel: the window stays open
            return
        if self._remember:
            self.save_settings()
            remember_folders_in(None)  # this session's store is done with
        # A running job is cancelled and the thread normally ends within a second. A job stuck
        # in something uncancellable (torch's first import, a model build, a long tokenisation)
        # is left to die with the process where the program exits with os._exit right after
        # (exits_process); anywhere else it is waited for: Qt aborts the process if a running
        # QThread is destroyed.
        self.training_panel.shutdown()  # no further chunks are submitted
        self.scaling_panel.shutdown()  # a background prediction stops at its next sub-block
        if not self.worker.stop(1000 if self.exits_process else 2000):
            if self.exits_process:
                log.info("closing with %s still running; it ends with the process",
                         ", ".join(self.worker.activity()) or "a job")
            else:
                self.statusBar().showMessage("waiting for the running job to finish…")
                self.worker.wait()
        super().closeEvent(event)


#: A store name never used, whose file name shows where the session's settings file lives.
_PROBE_APP = "unitscale-explorer-settings-probe"


def user_settings_path() -> str | None:
    """The file behind ``QSettings(SETTINGS_ORG, SETTINGS_APP)``, found without reading it
    (QSettings reads its file when constructed, and a FIFO there blocks for good): an unused
    store of the same organisation names the folder, honouring ``QSettings.setPath``. None
    where the settings are not a file of Qt's INI format (the Windows registry, macOS plists)."""
    fmt = QSettings.defaultFormat()
    if fmt == QSettings.Format.NativeFormat and sys.platform in ("win32", "darwin"):
        return None
    probe = Path(QSettings(fmt, QSettings.Scope.UserScope, SETTINGS_ORG, _PROBE_APP).fileName())
    return str(probe.with_name(SETTINGS_APP + probe.suffix))


def _import_name(source: Path) -> str:
    """How an imported config is named: its model folder for a ``config.json``."""
    return source.parent.name if source.name == "config.json" else source.name


def _first_line(exc: BaseException) -> str:
    """An exception's first line, at most 200 characters (a damaged value can be huge)."""
    lines = str(exc).splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:199] + "…"
