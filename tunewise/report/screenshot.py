"""Render a report page to PNG with headless Chromium (Debian's `chromium` package), to check it renders."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def find_chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def screenshot(page: Path, png: Path, width: int = 1200, height: int = 2000, timeout: int = 60) -> Path:
    exe = find_chromium()
    if exe is None:
        raise RuntimeError("no chromium found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={Path(png).resolve()}", Path(page).resolve().as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)
    if not Path(png).exists() or Path(png).stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot for {page}")
    return Path(png)


if __name__ == "__main__":  # python -m tunewise.report.screenshot report.html out.png
    import sys

    print(screenshot(Path(sys.argv[1]), Path(sys.argv[2])))
