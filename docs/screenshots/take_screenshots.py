"""The studio's screenshots for docs/screenshots/, taken offscreen at 1280x800 on tiny-llama (random
weights: the views' shapes are real, the generated text is not).

    .venv/bin/python docs/screenshots/take_screenshots.py [OUT_DIR] [--size 1280x800]

Writes setup-column.png, token-map-all-layers.png, token-map-one-layer.png, attention-map.png (a run
of about 1,760 tokens under h2o at 128) and evaluate-sweep.png (a needle sweep of 3 policies), each
quantised to 256 colours to stay small.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["KVSTUDIO_DATA_DIR"] = tempfile.mkdtemp(prefix="kvstudio-shots-")  # not the user's history

from PIL import Image  # noqa: E402
from PySide6.QtCore import QSettings, Qt  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

PROMPT = "the quick brown fox jumps over the lazy dog " * 40  # about 1,760 tokens on tiny-llama


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(Path(__file__).parent))
    parser.add_argument("--size", default="1280x800")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    width, height = (int(n) for n in args.size.split("x"))

    app = QApplication(sys.argv[:1])
    from kvstudio.gui.app import configure_plots
    from kvstudio.gui.main_window import MainWindow

    configure_plots()
    window = MainWindow(QSettings(tempfile.mktemp(suffix=".ini"), QSettings.IniFormat))
    window.resize(width, height)  # before the first show: the docks take their shares of this width
    window.show()

    def wait(condition, seconds=300.0):
        end = time.time() + seconds
        while not condition() and time.time() < end:
            app.processEvents()
            time.sleep(0.02)
        for _ in range(30):  # let the views draw what they read
            app.processEvents()
            time.sleep(0.01)

    def shot(name: str) -> None:
        window.views.refresh(include_hidden=True)
        wait(lambda: True)
        path = out / name
        window.grab().save(str(path))
        Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)
        print(f"{path} ({path.stat().st_size // 1024} KiB)")

    window.loading.request_load("tiny-llama", "cpu", "auto")
    wait(lambda: window.state.model_info is not None and not window.state.busy)
    window.form.policy.setCurrentText("h2o")
    window.form.policy_form.set_values({"budget": 128})
    window.form.max_new_tokens.setValue(24)
    window.form.chunk_size.setValue(256)
    window.prompt_area.prompt.setPlainText(PROMPT)
    window.docks["Set-up"].raise_()
    shot("setup-column.png")

    window.run.request_run()
    wait(lambda: not window.state.busy)
    token_map = window.docks["Token map"]
    token_map.raise_()
    window.views.token_view.layer.setCurrentIndex(0)
    shot("token-map-all-layers.png")
    window.views.token_view.layer.setCurrentIndex(3)  # layer 2
    shot("token-map-one-layer.png")
    window.docks["Attention map"].raise_()
    shot("attention-map.png")

    view = window.evaluate.view
    window.docks["Evaluate"].raise_()
    view.task.setCurrentText("needle")
    for row in range(view.policies.count()):
        item = view.policies.item(row)
        item.setCheckState(Qt.Checked if item.text() in ("full", "h2o", "streaming_llm") else Qt.Unchecked)
    view.budgets.setText("32")
    view.lengths.setText("400,600")
    view.depths.setText("0,0.5,1")
    view.chunk_size.setValue(64)
    view.start.click()
    wait(lambda: not window.state.busy)
    shot("evaluate-sweep.png")
    window.close_guard.ask = False
    window.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
