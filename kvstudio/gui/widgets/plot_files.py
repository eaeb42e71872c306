"""A pyqtgraph plot on screen as a file: PNG (at a chosen pixel width), SVG or PDF, drawn as it looks.

Why SVG and PDF set the device's resolution: pyqtgraph draws each axis into a cached QPicture
recorded at the widget's logical DPI (96), and Qt scales a picture replayed on a device of another
resolution by the ratio. QSvgGenerator defaults to 72 DPI, so the axes came out at 72/96 of their
size, pinned to the top left: the y axis's zero sat above the data's zero and the x axis stopped
short, while the curves (drawn directly) were right. Giving the generator the widget's DPI draws
axes and data on one scale. (pyqtgraph's own SVG exporter fails on Qt 6 paths, hence Qt's generator.)
"""

from __future__ import annotations

from pathlib import Path

FORMATS = (".png", ".svg", ".pdf")


def render_svg(widget, path: Path, title: str = "KV Studio plot") -> None:
    from PySide6.QtCore import QRect, QSize
    from PySide6.QtGui import QPainter
    from PySide6.QtSvg import QSvgGenerator

    generator = QSvgGenerator()
    generator.setFileName(str(path))
    generator.setResolution(widget.logicalDpiX())  # the axes' cached pictures are at this DPI: see above
    generator.setSize(QSize(widget.width(), widget.height()))
    generator.setViewBox(QRect(0, 0, widget.width(), widget.height()))
    generator.setTitle(title)
    painter = QPainter(generator)
    try:
        widget.render(painter)
    finally:
        painter.end()


def render_pdf(widget, path: Path, title: str = "KV Studio plot") -> None:
    """One page the widget's size, vector, at the widget's DPI (the same reason as for SVG)."""
    from PySide6.QtCore import QMarginsF, QSizeF
    from PySide6.QtGui import QPageLayout, QPageSize, QPainter, QPdfWriter

    writer = QPdfWriter(str(path))
    writer.setTitle(title)
    writer.setResolution(widget.logicalDpiX())
    points = QSizeF(widget.width() * 72 / widget.logicalDpiX(), widget.height() * 72 / widget.logicalDpiX())
    writer.setPageLayout(QPageLayout(QPageSize(points, QPageSize.Point), QPageLayout.Portrait, QMarginsF(0, 0, 0, 0)))
    painter = QPainter(writer)
    try:
        widget.render(painter)
    finally:
        painter.end()


def render_png(widget, path: Path, width_px: int | None = None) -> None:
    """The plot as pixels: pyqtgraph's exporter, which redraws at `width_px` (default: as on screen)."""
    import pyqtgraph.exporters as exporters

    exporter = exporters.ImageExporter(widget.getPlotItem())
    if width_px:
        exporter.parameters()["width"] = int(width_px)
    exporter.export(str(path))


def render_plot(widget, path: Path, width_px: int | None = None) -> None:
    """By the suffix: .png .svg .pdf (callers check the suffix first; see FORMATS)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".png":
        render_png(widget, path, width_px)
    elif suffix == ".svg":
        render_svg(widget, path)
    else:
        render_pdf(widget, path)
