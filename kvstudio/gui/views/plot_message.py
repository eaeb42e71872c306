"""A plot with nothing true to show says so in words, with its axes hidden: before a run's first data,
or for a layer that was not recorded. Empty pyqtgraph axes read -0.5..0.5 "(x0.001)", which means
nothing and looks like data."""

from __future__ import annotations

import pyqtgraph as pg


class PlotMessage:
    def __init__(self, plot: pg.PlotWidget, text: str = ""):
        self.plot = plot.getPlotItem()
        self.item = pg.TextItem("", color="#888888", anchor=(0.5, 0.5))
        self.item.setZValue(100)
        self.plot.addItem(self.item, ignoreBounds=True)
        self.shown = False
        if text:
            self.show(text)

    def show(self, text: str) -> None:
        """Hide the axes and the data range; show `text` in the middle."""
        self.item.setText(text)
        self.item.setPos(0.5, 0.5)
        self.item.show()
        if not self.shown:
            for axis in ("left", "bottom"):
                self.plot.hideAxis(axis)
            self.plot.getViewBox().disableAutoRange()
            self.plot.setRange(xRange=(0, 1), yRange=(0, 1), padding=0)
            self.shown = True

    def hide(self) -> None:
        """Data arrived: axes back, the range follows the data again."""
        if not self.shown:
            return
        self.item.hide()
        for axis in ("left", "bottom"):
            self.plot.showAxis(axis)
        self.plot.getViewBox().enableAutoRange()
        self.shown = False

    def text(self) -> str:
        return self.item.textItem.toPlainText() if self.shown else ""
