"""The one InferenceService definition: the kustomize overlays (`kustomize/overlays/<env>`).

`fraud deploy --target kubernetes` creates the InferenceService from an overlay's rendered
InferenceService and adds only the rollout fields (`kserve_rollout.build_inference_service`).
An overlay is named one of two ways:

* `dev`, `staging`, `prod`: the overlay as rendered by `kubectl kustomize kustomize/overlays/<env>`,
  shipped inside the package (`fraud/deploy/overlays/<env>.yaml`), so an installed wheel deploys
  without the repository or kubectl. `python -m fraud.deploy.overlay` re-renders them from the
  repository (tests fail when they are out of date);
* a path: a kustomization directory (rendered with `kubectl kustomize`) or a YAML file of
  already-rendered objects (`kubectl kustomize ... > rendered.yaml`): your own overlay.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from fraud.config import MODEL_NAME
from fraud.deploy.state import RolloutError

#: The overlays the package ships, rendered.
OVERLAYS: tuple[str, ...] = ("dev", "staging", "prod")
PACKAGED_DIR = Path(__file__).with_name("overlays")
KIND = "InferenceService"


def packaged_path(name: str) -> Path:
    return PACKAGED_DIR / f"{name}.yaml"


def _pick(documents: list[Any], source: str, name: str) -> dict[str, Any]:
    found = [
        doc
        for doc in documents
        if isinstance(doc, dict) and doc.get("kind") == KIND and (doc.get("metadata") or {}).get("name") == name
    ]
    if len(found) != 1:
        raise RolloutError(f"overlay {source}: expected one InferenceService named {name}, found {len(found)}")
    return found[0]


def render_kustomization(directory: Path) -> list[Any]:
    """`kubectl kustomize DIRECTORY` as a list of objects."""
    try:
        done = subprocess.run(  # noqa: S603 - fixed argument list, no shell
            ["kubectl", "kustomize", str(directory)],  # noqa: S607 - kubectl is the user's own client, found on PATH
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
    except FileNotFoundError:
        raise RolloutError(
            f"overlay {directory} is a kustomization: rendering it needs kubectl on PATH "
            "(or pass a rendered YAML file, or one of " + ", ".join(OVERLAYS) + ")"
        ) from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RolloutError(f"kubectl kustomize {directory} failed: {last}")
    return list(yaml.safe_load_all(done.stdout))


def load_inference_service(overlay: str, name: str = MODEL_NAME) -> dict[str, Any]:
    """The InferenceService `name` of `overlay` (a packaged overlay name or a path); RolloutError otherwise."""
    if overlay in OVERLAYS:
        path, source = packaged_path(overlay), f"{overlay} (packaged)"
    else:
        path, source = Path(overlay), overlay
        if not path.exists():
            raise RolloutError(f"overlay {overlay!r} is neither one of {', '.join(OVERLAYS)} nor an existing path")
    if path.is_dir():
        return _pick(render_kustomization(path), source, name)
    try:
        documents = list(yaml.safe_load_all(path.read_text()))
    except OSError as exc:
        raise RolloutError(f"cannot read overlay {source}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise RolloutError(f"overlay {source} is not valid YAML: {exc}") from None
    return _pick(documents, source, name)


def overlay_for_namespace(namespace: str) -> str:
    """The packaged overlay whose namespace is `namespace`; RolloutError naming --overlay otherwise."""
    for overlay in OVERLAYS:
        if load_inference_service(overlay)["metadata"].get("namespace") == namespace:
            return overlay
    raise RolloutError(
        f"no packaged overlay deploys to namespace {namespace!r}: name one with --overlay "
        f"({', '.join(OVERLAYS)} or a kustomization directory / rendered YAML file)"
    )


def refresh(kustomize_root: Path) -> list[Path]:
    """Re-render the packaged overlays from `kustomize_root/overlays/<env>`."""
    written = []
    for overlay in OVERLAYS:
        isvc = _pick(render_kustomization(kustomize_root / "overlays" / overlay), overlay, MODEL_NAME)
        header = f"# Rendered by `python -m fraud.deploy.overlay` from kustomize/overlays/{overlay}: do not edit.\n"
        packaged_path(overlay).write_text(header + yaml.safe_dump(isvc, sort_keys=False))
        written.append(packaged_path(overlay))
    return written


if __name__ == "__main__":
    from fraud.config import PROJECT_ROOT

    for path in refresh(PROJECT_ROOT / "kustomize"):
        print(f"wrote {path}", file=sys.stderr)
