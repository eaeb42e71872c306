"""Plots in a grid that fits its pane: as many a row as the pane's width holds, the rest below, the
page scrolling down when the rows are taller than the pane.

A pyqtgraph layout laid out at a fixed column count is wider than a narrow dock (the Evaluate
view's right-hand heatmaps were cut off at 1280x800: the scene's layout does not shrink below its
items' minimum widths, it spills past the view's edge). Here the column count follows the width,
and the grid re-lays itself out when the pane is resized."""

from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtCore import QEvent, QObject, QRectF, Qt

from kvstudio.gui.widgets.scrolling import scrolling
from kvstudio.gui.widgets.wheel_scrolls import wheel_scrolls_page


class PlotGrid(QObject):
    """`view` (a GraphicsLayoutWidget) in a scroll area (`self.page`), its plots `columns` a row at most,
    fewer when its width holds fewer; a `footer` item (a colour bar) spans the row below them."""

    def __init__(self, view: pg.GraphicsLayoutWidget, *, max_columns: int = 2, min_width: int = 160,
                 row_height: int = 170, footer_height: int = 70):
        super().__init__(view)
        self.view = view
        self.max_columns, self.min_width = max_columns, min_width
        self.row_height, self.footer_height = row_height, footer_height
        self.plots: list = []
        self.footer = None
        self.columns = 0
        self.page = scrolling(view, sideways=False)
        wheel_scrolls_page(view)  # the wheel over a heatmap scrolls the page (the plots do not zoom)
        self.page.installEventFilter(self)

    def set_items(self, plots: list, footer=None) -> None:
        """Show `plots` (already made, not yet in the layout) and `footer`, in place of what was shown."""
        self.view.clear()
        self.plots, self.footer, self.columns = list(plots), footer, 0
        self.arrange()

    def columns_that_fit(self) -> int:
        if not self.plots:
            return 0
        # The widest plot's own minimum (its title, its axis) counts, not only the nominal width;
        # and the layout's margins and the spacing between columns.
        needed = max([self.min_width] + [plot.effectiveSizeHint(Qt.MinimumSize).width() for plot in self.plots])
        grid = self.view.ci.layout
        left, _, right, _ = grid.getContentsMargins()
        spacing = grid.horizontalSpacing()
        fit = int((self.width() - left - right + spacing) // (needed + spacing))
        return max(1, min(self.max_columns, len(self.plots), fit))

    def width(self) -> float:
        """The width the plots have, the scroll bar's taken off whether it shows or not: counting it
        only when shown, two columns (short, no scroll bar) and one (tall, a scroll bar) took turns."""
        return self.page.width() - self.page.verticalScrollBar().sizeHint().width()

    def arrange(self) -> None:
        columns = self.columns_that_fit()
        if columns == self.columns:
            return
        layout = self.view.ci
        for item in list(layout.items):
            layout.removeItem(item)  # out of the grid, still alive: it goes back in at its new cell
        for index, plot in enumerate(self.plots):
            layout.addItem(plot, row=index // columns, col=index % columns)
        rows = -(-len(self.plots) // columns) if columns else 0
        if self.footer is not None:
            layout.addItem(self.footer, row=rows, col=0, colspan=max(columns, 1))
        self.columns = columns
        # The layout kept the width its former columns needed (wider than the view): back to the view's.
        layout.setGeometry(QRectF(self.view.rect()))
        self.view.setMinimumHeight(rows * self.row_height + (self.footer_height if self.footer is not None else 0))

    def eventFilter(self, watched, event) -> bool:
        if event.type() == QEvent.Resize and self.plots:
            self.arrange()
        return False
