"""Static checks of the container images (no Docker engine here): every file a Dockerfile copies
exists and survives .dockerignore, the lock files they install from exist, the images are
multi-stage, pinned, non-root, health-checked and read-only-root compatible, and the modules
their CMD runs exist and start (`--help`)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest

from fraud.config import PROJECT_ROOT

DOCKERFILES = {
    "core": PROJECT_ROOT / "docker" / "core.Dockerfile",
    "drift": PROJECT_ROOT / "docker" / "drift-transformer.Dockerfile",
}
SECRETISH = re.compile(r"(?i)(password|passwd|secret|token|api_?key|credential)")


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def stages(path: Path) -> tuple[dict[str, str], list[Stage]]:
    args: dict[str, str] = {}
    found: list[Stage] = []
    for keyword, rest in instructions(path):
        if keyword == "ARG" and not found:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], ""), parts[0])
            found.append(Stage(base, parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else ""))
        elif found:
            found[-1].instructions.append((keyword, rest))
    return args, found


def copies(stage: Stage) -> list[tuple[list[str], str, str]]:
    """(sources, destination, workdir) of the stage's COPY instructions from the build context."""
    result, workdir = [], "/"
    for keyword, rest in stage.instructions:
        if keyword == "WORKDIR":
            workdir = rest
        elif keyword == "COPY":
            words = shlex.split(rest)
            if any(w.startswith("--from") for w in words):
                continue
            paths = [w for w in words if not w.startswith("--")]
            result.append((paths[:-1], paths[-1], workdir))
    return result


def dockerignore_patterns() -> list[str]:
    lines = (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: a path is excluded if it or one of its parents matches a pattern."""
    parts = PurePosixPath(relative).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!")
        regex = fnmatch.translate(body).replace(".*.*/", "(.*/)?").replace(".*.*", ".*")
        if (
            any(re.match(regex, c) for c in candidates)
            or (body.startswith("**/") and any(fnmatch.fnmatch(p, body[3:]) for p in parts))
        ) and not negate:
            return True
    return False


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_copied_files_exist_and_are_in_the_build_context(image):
    _, found = stages(DOCKERFILES[image])
    patterns = dockerignore_patterns()
    copied = 0
    for stage in found:
        for sources, _, _ in copies(stage):
            for source in sources:
                assert (PROJECT_ROOT / source).exists(), f"{image}: COPY source {source} does not exist"
                assert not ignored(source, patterns), f"{image}: COPY source {source} is excluded by .dockerignore"
                copied += 1
    assert copied >= 3


def test_dockerignore_matching_works():
    patterns = dockerignore_patterns()
    assert ignored("drift_transformer/.venv/lib/x.py", patterns)
    assert ignored("fraud/__pycache__/a.pyc", patterns)
    assert ignored("data/raw/x.parquet", patterns)
    assert not ignored("fraud/bundle.py", patterns)
    assert not ignored("uv.lock", patterns)


@pytest.mark.parametrize(("image", "lock"), [("core", "uv.lock"), ("drift", "drift_transformer/uv.lock")])
def test_images_install_from_the_lock_file_without_dev_dependencies(image, lock):
    _, found = stages(DOCKERFILES[image])
    runs = [rest for stage in found for keyword, rest in stage.instructions if keyword == "RUN"]
    syncs = [r for r in runs if "uv sync" in r]
    assert syncs and all("--frozen" in r and "--no-dev" in r for r in syncs), syncs
    assert not any("pip install" in r and "uv==" not in r for r in runs), "dependencies must come from the lock"
    sources = [s for stage in found for srcs, _, _ in copies(stage) for s in srcs]
    assert lock in sources and (PROJECT_ROOT / lock).is_file()


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_images_are_pinned_multistage_nonroot_and_healthchecked(image):
    args, found = stages(DOCKERFILES[image])
    assert len(found) >= 2, "multi-stage build expected"
    for stage in found:
        assert re.fullmatch(
            r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?|python@sha256:[0-9a-f]{64}", stage.base
        ), stage.base
    final = found[-1]
    keywords = [k for k, _ in final.instructions]
    assert "HEALTHCHECK" in keywords
    users = [rest for k, rest in final.instructions if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    env = " ".join(rest for k, rest in final.instructions if k == "ENV")
    assert "HOME=/tmp" in env and "TMPDIR=/tmp" in env
    for keyword, rest in (item for stage in found for item in stage.instructions):
        if keyword in ("ENV", "ARG", "LABEL"):
            assert not SECRETISH.search(rest), f"{image}: {keyword} {rest} looks like a credential"
    assert not any(SECRETISH.search(name) for name in args)


def _module_file(image: str) -> tuple[str, Path]:
    """The module the image's CMD runs and the repository file `python -m` would execute."""
    _, found = stages(DOCKERFILES[image])
    final = found[-1]
    (command,) = [json.loads(rest) for k, rest in final.instructions if k in ("CMD", "ENTRYPOINT")]
    assert command[:2] == ["python", "-m"], command
    module = command[2]
    image_path = PurePosixPath("/app") / module.replace(".", "/") / "__main__.py"
    for stage in found:
        for sources, dest, workdir in copies(stage):
            target = PurePosixPath(workdir) / dest
            for source in sources:
                local = PROJECT_ROOT / source
                if local.is_dir():
                    try:
                        return module, local / image_path.relative_to(target)
                    except ValueError:
                        continue
                into_dir = dest.endswith("/") or dest in (".", "./") or len(sources) > 1
                if (target / local.name if into_dir else target) == image_path:
                    return module, local
    raise AssertionError(f"{image}: no COPY puts {image_path} into the image")


@pytest.mark.parametrize(
    ("image", "python", "cwd"),
    [
        ("core", Path(sys.executable), PROJECT_ROOT),
        ("drift", PROJECT_ROOT / "drift_transformer" / ".venv" / "bin" / "python", PROJECT_ROOT / "drift_transformer"),
    ],
)
def test_entry_module_exists_and_starts(image, python, cwd):
    module, path = _module_file(image)
    if not path.is_file():
        pytest.skip(f"{path.relative_to(PROJECT_ROOT)} is not written yet (entry point of the {image} image)")
    assert python.exists(), f"{python} missing: run `make setup`"
    env = {**os.environ, "HOME": str(cwd), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(  # noqa: PLW1510 - the return code is asserted below
        [str(python), "-m", module, "--help"], cwd=cwd, capture_output=True, text=True, timeout=180, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--bundle" in result.stdout and "--model_name" in result.stdout
