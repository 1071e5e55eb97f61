"""Settings shared by every pipeline component."""

import os

#: The project's core image (pipeline components and predictor). Name and tag are configuration:
#: set FRAUD_CORE_IMAGE before compiling to point the compiled pipeline at your registry.
CORE_IMAGE = os.environ.get("FRAUD_CORE_IMAGE", "ghcr.io/fraud-platform/fraud-core:0.1.0")
