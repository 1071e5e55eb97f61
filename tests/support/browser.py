"""Debian's headless chromium for tests: a screenshot of a page and the DOM it rendered (after
its scripts ran), so a test can check that a web UI draws what it should."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

from tests.conftest import require

INSTALL_HINT = "chromium (Debian package chromium; `make services` installs it)"
#: what headless chromium needs in a container: no sandbox (no user namespaces), no GPU, /tmp not /dev/shm
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars")
#: virtual time the page gets to load its scripts and run their requests (ms)
BUDGET_MS = 20000


def chromium() -> str:
    binary = shutil.which("chromium")
    require(binary, INSTALL_HINT)
    return str(binary)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [chromium(), *FLAGS, f"--virtual-time-budget={BUDGET_MS}", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"chromium {args} exited {done.returncode}: {done.stderr[-2000:]}"
    return done


def screenshot(url: str, out: Path, width: int = 1280, height: int = 900) -> tuple[int, int]:
    """Render `url` into the PNG `out`; returns the image's (width, height) from its header."""
    _run(f"--window-size={width},{height}", f"--screenshot={out}", url)
    header = out.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{out} is not a PNG"
    return struct.unpack(">II", header[16:24])


def rendered_dom(url: str) -> str:
    """The page's DOM after its scripts ran (what the user sees, as HTML)."""
    return _run("--dump-dom", url).stdout
