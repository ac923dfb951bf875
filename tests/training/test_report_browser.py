"""The rubric report opened in headless Chromium, offline, with its plots on screen."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import numpy
import pytest

from core.config import DatabaseSettings
from core.storage import db
from tests.training.test_report import score_row
from training.report import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The bar colour of the score distribution plot (#4a7ab5), as RGB in 0..1.
BAR_COLOUR = numpy.array([0x4A, 0x7A, 0xB5]) / 255


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)")
async def test_report_renders_in_headless_chromium(sqlite_url: str, tmp_path: Path) -> None:
    engine = db.create_engine(DatabaseSettings(url=sqlite_url))
    sessions = db.create_session_factory(engine)
    async with sessions.begin() as session:
        session.add_all(
            [score_row(f"k{index}", "base", 2 + index % 4, index % 20) for index in range(30)]
        )
    try:
        page = await build_report(sessions, tmp_path / "report")
    finally:
        await engine.dispose()
    screenshot = tmp_path / "report.png"

    subprocess.run(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--allow-file-access-from-files",
            "--window-size=1200,2600",
            f"--screenshot={screenshot}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )

    pixels = matplotlib.image.imread(screenshot)[:, :, :3]
    bar_pixels = numpy.all(numpy.abs(pixels - BAR_COLOUR) < 0.03, axis=2).sum()
    # The distribution plot's bars cover thousands of pixels once the image has loaded.
    assert bar_pixels > 2000
