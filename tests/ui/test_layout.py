"""The default layout: the model editor at the side, the views as tabs, each with room.

At 1366×768 and 1920×1080 with no saved settings the scale chart takes at least 60% of the
window's height (four views sharing one screen left it ~110 px at 1636×800), and every panel
gets at least the room its contents ask for (so labels do not overlap or clip)."""

from __future__ import annotations

import pytest
from PySide6.QtGui import QAction
from PySide6.QtWidgets import QApplication, QTabBar, QWidget

from app.main_window import MainWindow
from app.widgets.scale_chart import NameAxis

VIEWS = ("Scaling", "Sizes", "Positional", "Attention", "Training")


def front_tab(win: MainWindow) -> str:
    """The title of the view in front (the tab bar holding the views' tabs)."""
    for bar in win.findChildren(QTabBar):
        titles = [bar.tabText(i) for i in range(bar.count())]
        if "Scaling" in titles:
            return bar.tabText(bar.currentIndex())
    return ""


@pytest.fixture
def fresh(qtbot):
    """``fresh(width, height)``: a window with no saved settings, shown at that size."""
    windows = []

    def make(width: int, height: int) -> MainWindow:
        win = MainWindow()  # restore_settings=False: nothing saved is read
        qtbot.addWidget(win)
        win.resize(width, height)
        win.show()
        qtbot.waitExposed(win)
        for _ in range(5):
            QApplication.processEvents()
        windows.append(win)
        return win

    yield make
    for win in windows:
        win.close()


@pytest.mark.parametrize("size", [(1366, 768), (1920, 1080)])
def test_scale_chart_gets_most_of_the_height(qtbot, fresh, size):
    win = fresh(*size)
    assert win.size().toTuple() == size  # the layout's minimum fits the screen size
    chart = win.findChild(QWidget, "scaleChart")
    assert chart.isVisible()
    assert chart.height() / win.height() >= 0.6, (chart.height(), win.height())
    # every row in the default view is named, one label per row, none overlapping
    axis = win.scaling_panel.chart.plot.getAxis("left")
    vb = win.scaling_panel.chart.plot.getViewBox()
    y0, y1 = vb.viewRange()[1]
    ticks = axis.tickValues(y0, y1, vb.height())
    assert ticks[0][0] == 1  # step: every row
    assert vb.height() / (y1 - y0) >= NameAxis.LABEL_PX


@pytest.mark.parametrize("size", [(1366, 768), (1920, 1080)])
def test_every_panel_gets_the_room_it_asks_for(qtbot, fresh, size):
    win = fresh(*size)
    for title in ("Model", *VIEWS):
        dock = win.docks[title]
        win.show_dock(dock)
        QApplication.processEvents()
        panel = dock.widget()
        assert panel.isVisible(), title
        need = panel.minimumSizeHint()
        assert panel.width() >= need.width() and panel.height() >= need.height(), \
            (title, panel.size().toTuple(), need.toTuple())
    assert win.docks["Model"].isVisible()  # the editor stays beside every view


def test_views_are_tabs_with_scaling_in_front(qtbot, fresh):
    win = fresh(1366, 768)
    scaling = win.docks["Scaling"]
    assert set(d.objectName() for d in win.tabifiedDockWidgets(scaling)) == \
        {win.docks[t].objectName() for t in VIEWS[1:]}
    assert front_tab(win) == "Scaling"
    assert not win.attention_panel._on_screen()  # noqa: SLF001 (behind the Scaling tab)
    # View → Positional panel brings that tab to the front (it does not close it)
    action = win.findChild(QAction, "showPositionalAction")
    action.trigger()
    qtbot.waitUntil(lambda: front_tab(win) == "Positional")
    action.trigger()
    QApplication.processEvents()
    assert front_tab(win) == "Positional" and win.docks["Positional"].isVisible()
    win.restore_default_layout()
    qtbot.waitUntil(lambda: front_tab(win) == "Scaling")


def test_attention_is_active_only_while_its_tab_is_shown(qtbot, fresh):
    win = fresh(1366, 768)
    calls: list[bool] = []
    original = win.attention_panel.set_active

    def spy(active: bool) -> None:
        calls.append(active)
        original(active)

    win.docks["Attention"].visibilityChanged.disconnect(original)
    win.docks["Attention"].visibilityChanged.connect(spy)
    win.show_dock(win.docks["Attention"])
    QApplication.processEvents()
    assert calls and calls[-1] is True
    win.show_dock(win.docks["Scaling"])
    QApplication.processEvents()
    assert calls[-1] is False


def test_default_size_fits_the_screen(qtbot):
    win = MainWindow()
    qtbot.addWidget(win)
    area = win.screen().availableGeometry()
    assert win.width() <= area.width() and win.height() <= area.height()
    assert win.width() >= min(area.width() - 16, win.minimumSizeHint().width())
    win.close()
