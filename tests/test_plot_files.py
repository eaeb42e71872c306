"""Plots exported as they look: the SVG's and the PDF's axes line up with the data exactly as in the PNG.

The SVG is drawn back to pixels with Qt's own SVG renderer, and both pictures are measured: where the
curve's extremes are, where the axis lines run, and where the tick of y = 0 sits against the curve's
lowest point (the bug: SVG axes came out at 72/96 of their size, zero above the data's zero)."""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("pytestqt")

import pyqtgraph as pg  # noqa: E402
from PySide6.QtGui import QColor, QImage, QPainter  # noqa: E402
from PySide6.QtSvg import QSvgRenderer  # noqa: E402

from kvstudio.gui.widgets.plot_files import render_pdf, render_png, render_svg  # noqa: E402

CURVE = (255, 0, 255)


def _pixels(image: QImage) -> np.ndarray:
    converted = image.convertToFormat(QImage.Format_RGB888)  # kept alive until its bytes are copied
    row_bytes, height, width = converted.bytesPerLine(), converted.height(), converted.width()
    buffer = np.frombuffer(converted.constBits(), dtype=np.uint8)[: row_bytes * height].copy()
    return buffer.reshape(height, row_bytes)[:, : width * 3].reshape(height, width, 3)


def _near(pixels, colour, tolerance=40) -> np.ndarray:
    return (np.abs(pixels.astype(int) - np.array(colour)).max(axis=2) <= tolerance)


def _grey(pixels) -> np.ndarray:
    """Axis pixels: grey, however antialiasing spread a line over two pixel columns."""
    values = pixels.astype(int)
    return (values.max(axis=2) - values.min(axis=2) <= 12) & (values.min(axis=2) >= 45) & (values.max(axis=2) <= 215)


def _measure(pixels) -> dict:
    """Curve extremes, the axis lines, and the rows of the left axis's ticks."""
    ys, xs = np.nonzero(_near(pixels, CURVE))
    axis = _grey(pixels)
    left = int(np.argmax(axis.sum(axis=0)))  # the column with the longest grey run: the y axis line
    bottom = int(np.argmax(axis.sum(axis=1)))  # the row with the longest grey run: the x axis line
    tick_rows = np.flatnonzero(axis[:, left + 2:left + 5].all(axis=1))  # ticks point into the plot, right of the line
    return {"curve": (xs.min(), xs.max(), ys.min(), ys.max()), "left": left, "bottom": bottom,
            "bottom_extent": np.flatnonzero(axis[bottom]).max(), "ticks": tick_rows}


def test_svg_axes_line_up_with_the_data_as_in_the_png(qtbot, tmp_path):
    widget = pg.PlotWidget()
    qtbot.addWidget(widget)
    widget.resize(640, 420)
    widget.plot([0, 5, 10], [0, 100, 50], pen=pg.mkPen(CURVE, width=3))
    widget.setYRange(0, 100)
    widget.show()
    qtbot.waitExposed(widget)
    render_png(widget, tmp_path / "plot.png")
    render_svg(widget, tmp_path / "plot.svg")
    png = _pixels(QImage(str(tmp_path / "plot.png")))
    svg_image = QImage(widget.width(), widget.height(), QImage.Format_RGB888)
    svg_image.fill(QColor("white"))
    painter = QPainter(svg_image)
    QSvgRenderer(str(tmp_path / "plot.svg")).render(painter)
    painter.end()
    svg = _pixels(svg_image)
    assert png.shape == svg.shape
    from_png, from_svg = _measure(png), _measure(svg)
    assert np.abs(np.subtract(from_png["curve"], from_svg["curve"])).max() <= 1
    for key in ("left", "bottom", "bottom_extent"):  # the x axis runs as far in both
        assert abs(from_png[key] - from_svg[key]) <= 1, key
    # The tick of y = 0 is level with the curve's lowest point (y = 0) in both pictures.
    zero_row = from_png["curve"][3]
    for measured in (from_png, from_svg):
        assert np.abs(measured["ticks"] - zero_row).min() <= 2, measured["ticks"]
    # The SVG's own numbers: its view box is the widget's pixels, so coordinates compare one to one.
    text = (tmp_path / "plot.svg").read_text()
    assert re.search(r'viewBox="0 0 640 420"', text)


def test_pdf_is_one_page_the_plots_size(qtbot, tmp_path):
    widget = pg.PlotWidget()
    qtbot.addWidget(widget)
    widget.resize(480, 300)
    widget.plot([0, 1], [0, 1])
    widget.show()
    render_pdf(widget, tmp_path / "plot.pdf")
    content = (tmp_path / "plot.pdf").read_bytes()
    assert content[:5] == b"%PDF-" and content.count(b"/Type /Page\n") + content.count(b"/Type /Page ") >= 1
    box = re.search(rb"/MediaBox \[\s*0 0 ([\d.]+) ([\d.]+)\s*\]", content)
    dpi = widget.logicalDpiX()
    assert box and abs(float(box.group(1)) - 480 * 72 / dpi) < 1 and abs(float(box.group(2)) - 300 * 72 / dpi) < 1


def test_png_at_a_chosen_width(qtbot, tmp_path):
    widget = pg.PlotWidget()
    qtbot.addWidget(widget)
    widget.resize(400, 300)
    widget.plot([0, 1], [0, 1])
    widget.show()
    render_png(widget, tmp_path / "wide.png", width_px=1200)
    assert QImage(str(tmp_path / "wide.png")).width() == 1200
