"""The transformer's typed settings: read once in main, the defaults of its options."""

from __future__ import annotations

from pathlib import Path

from drift_transformer.__main__ import build_parser
from drift_transformer.settings import TransformerSettings


def test_fraud_bundle_is_the_default_of_bundle_and_the_option_overrides_it():
    settings = TransformerSettings.from_env({"FRAUD_BUNDLE": "/models/b", "UNRELATED": "x"})
    assert settings.bundle == Path("/models/b")
    assert build_parser(settings).parse_args(["--predictor_host", "h:1"]).bundle == "/models/b"
    assert build_parser(settings).parse_args(["--bundle", "/other"]).bundle == "/other"
    assert TransformerSettings.from_env({"FRAUD_BUNDLE": "  "}).bundle == Path("/mnt/models")


def test_own_options_are_kebab_case_and_kserve_options_keep_their_names():
    parser = build_parser(TransformerSettings())
    own = {"--drift-window-size", "--online-ert", "--token-file", "--predictor-token-file", "--access-log"}
    flags = {flag for action in parser._actions for flag in action.option_strings}
    assert own <= flags
    assert not {"--drift_window_size", "--online_ert", "--token_file", "--enable_access_log"} & flags
    assert {"--model_name", "--predictor_host", "--http_port", "--grpc_port"} <= flags  # KServe's own
