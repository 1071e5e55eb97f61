"""Settings shared by every pipeline component."""

import os
import re

from fraud.deploy.kserve_rollout import CORE_IMAGE_ENV
from fraud.settings import Settings

#: `registry/name:tag`, `registry/name@sha256:<digest>` or `registry/name:tag@sha256:<digest>`.
_IMAGE_REFERENCE = re.compile(
    r"^(?P<name>[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:[._/-][a-z0-9]+)*)*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


def image_reference(value: str) -> str:
    """`value` if it is a valid image reference with a tag or a digest, else ValueError."""
    match = _IMAGE_REFERENCE.match(value.strip())
    if not match or not (match["tag"] or match["digest"]):
        raise ValueError(
            f"{CORE_IMAGE_ENV}={value!r} is not an image reference with a tag or a digest "
            "(registry/name:tag or registry/name@sha256:<64 hex digits>)"
        )
    return value.strip()


#: The one image every component runs in. Set FRAUD_CORE_IMAGE before compiling to point the
#: compiled pipeline at your registry; pin it by digest (`...@sha256:...`) for reproducible runs.
#: Read once, when the components are defined (the compile's entry point).
CORE_IMAGE = image_reference(Settings.from_env().core_image)


def deployer_kubeconfig(token_dir: str) -> str | None:
    """A kubeconfig file for the in-cluster API server authenticated with the ServiceAccount token
    mounted at `token_dir` (keys `token`, `ca.crt`, `namespace` of a kubernetes.io/service-account-token
    Secret); None when nothing is mounted there (local runs: the caller's own kubeconfig)."""
    import tempfile
    from pathlib import Path

    import yaml

    folder = Path(token_dir) if token_dir else None
    if folder is None or not (folder / "token").is_file():
        return None
    # Kubernetes's own service-discovery variables of the pod (not settings of this platform)
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "kubernetes.default.svc")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "in-cluster", "cluster": {"server": server, "certificate-authority": str(folder / "ca.crt")}}
        ],
        "users": [{"name": "fraud-deployer", "user": {"tokenFile": str(folder / "token")}}],
        "contexts": [{"name": "fraud-deployer", "context": {"cluster": "in-cluster", "user": "fraud-deployer"}}],
        "current-context": "fraud-deployer",
    }
    handle, path = tempfile.mkstemp(prefix="fraud-deployer-", suffix=".kubeconfig")
    with os.fdopen(handle, "w") as out:
        yaml.safe_dump(config, out)
    return path
